"""A restart gets back exactly what the last round saved; a torn file never crashes it."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmtune.node.config import parse_config
from swarmtune.node.engine.checkpoint import Checkpoint, remove_dead_temps
from swarmtune.node.engine.peer import Peer
from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.transport import InMemoryHub, InMemoryTransport
from swarmtune.node.local.build import LocalModel, build_local_model

# nesterov keeps a momentum buffer in the group state
CONFIG = parse_config(
    {"inner": {"steps": 3, "batch_size": 4, "seq_len": 32}, "outer": {"name": "nesterov"}}
)
ROUNDS = 2


def _local(seed: int = 7) -> LocalModel:
    return build_local_model(CONFIG, "builtin:arithmetic", data_seed=seed)


def _peer(local: LocalModel, workdir: Path, hub: InMemoryHub | None = None, name: str = "p0"):
    transport = InMemoryTransport(hub or InMemoryHub(expected=1), name)
    return Peer(local.trainer, transport, CONFIG, Checkpoint(workdir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Peer, GroupState]:
    """Two peers averaged ROUNDS rounds; p0's work dir, Peer and final state."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt")
    hub = InMemoryHub(expected=2)
    peers = [_peer(_local(7 + i), root / f"p{i}", hub, f"p{i}") for i in range(2)]
    states: list[GroupState] = []
    threads = [threading.Thread(target=lambda p=p: states.append(p.run(ROUNDS))) for p in peers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(states) == 2 and states[0].digest() == states[1].digest()
    return root / "p0", peers[0], states[0]


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _copy_workdir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("state.safetensors", "local.pt"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_resume_restores_moments_data_position_and_outer_state_exactly(trained) -> None:
    workdir, first, final = trained
    saved_local = torch.load(workdir / "local.pt", weights_only=True)
    assert saved_local["round"] == final.round == ROUNDS
    moments = saved_local["local"]["optimizer"]["state"]
    assert moments and all(s["exp_avg"].abs().sum() > 0 for s in moments.values())
    assert saved_local["local"]["batches"]["batches_drawn"] == ROUNDS * CONFIG.inner.steps
    buffer = final.outer_state["buffer"]  # nesterov momentum, part of the group state
    assert buffer and all(v.abs().sum() > 0 for v in buffer.values())

    local = _local()
    reborn = _peer(local, workdir)
    state = reborn.initial_state()
    assert reborn.resumed_from == ROUNDS
    _assert_same(final.params, state.params, "params")
    _assert_same(final.outer_state, state.outer_state, "outer")
    _assert_same(saved_local["local"], local.trainer.state_dict(), "local")
    _assert_same(first.trainer.state_dict(), local.trainer.state_dict(), "live")
    # the data stream goes on where it stopped, not from its start
    torch.testing.assert_close(
        first.trainer.batches.next_batch().input_ids, local.trainer.batches.next_batch().input_ids
    )


TORN = {
    "truncated": lambda blob: blob[: len(blob) // 2],
    "garbage": lambda blob: os.urandom(len(blob)),
    "empty": lambda blob: b"",
    "not-a-checkpoint": None,  # a valid torch file of the wrong shape
}


@pytest.mark.parametrize("kind", sorted(TORN))
def test_torn_local_file_is_set_aside_and_the_group_state_kept(
    trained, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    workdir, _, final = trained
    _copy_workdir(workdir, tmp_path)
    torn_path = tmp_path / "local.pt"
    tear = TORN[kind]
    if tear is None:
        torch.save([1, 2, 3], torn_path)
    else:
        torn_path.write_bytes(tear(torn_path.read_bytes()))
    torn = torn_path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="swarmtune.checkpoint"):
        loaded = Checkpoint(tmp_path).load({k: v.shape for k, v in final.params.items()})
    assert loaded is not None
    state, local = loaded
    assert local is None and state.digest() == final.digest()
    assert (tmp_path / "state.safetensors").read_bytes() == (
        workdir / "state.safetensors"
    ).read_bytes()
    aside = list(tmp_path.glob("local.corrupt-*.pt"))
    assert not torn_path.exists() and len(aside) == 1 and aside[0].read_bytes() == torn
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_peer_with_a_torn_local_file_resumes_the_group_state_with_fresh_moments(
    trained, tmp_path: Path
) -> None:
    workdir, _, final = trained
    _copy_workdir(workdir, tmp_path)
    (tmp_path / "local.pt").write_bytes((workdir / "local.pt").read_bytes()[:100])
    local = _local()
    peer = _peer(local, tmp_path)
    state = peer.initial_state()
    assert peer.resumed_from == ROUNDS and state.digest() == final.digest()
    assert not local.trainer.state_dict()["optimizer"]["state"]
    peer.save(state)  # the next save writes a good local file again
    assert torch.load(tmp_path / "local.pt", weights_only=True)["round"] == ROUNDS


def test_local_file_of_another_round_is_ignored_but_kept(trained, tmp_path: Path) -> None:
    workdir, _, final = trained
    _copy_workdir(workdir, tmp_path)
    older = GroupState(final.round - 1, final.params, final.outer_state)
    (tmp_path / "state.safetensors").unlink()
    Checkpoint(tmp_path).save(older, {"optimizer": {}, "batches": {}})
    (tmp_path / "state.safetensors").write_bytes((workdir / "state.safetensors").read_bytes())
    loaded = Checkpoint(tmp_path).load({k: v.shape for k, v in final.params.items()})
    assert loaded is not None and loaded[0].round == final.round and loaded[1] is None
    assert (tmp_path / "local.pt").exists() and not list(tmp_path.glob("*.corrupt-*"))


def test_temp_files_of_a_killed_writer_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / ".local.pt.tmp-4194305"  # above Linux's largest possible pid
    live = tmp_path / f".local.pt.tmp-{os.getpid()}"
    other = tmp_path / "notes.tmp-1"
    for path in (dead, live, other):
        path.write_bytes(b"x")
    assert remove_dead_temps(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


def test_local_state_of_other_data_gives_fresh_moments_not_a_crash_loop(
    trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the work dir's local.pt was written by a peer with a longer data set (e.g. its p2p.key
    # was deleted, so its data seed and data position changed): it cannot be loaded as is
    workdir, _, final = trained
    _copy_workdir(workdir, tmp_path)
    saved = torch.load(tmp_path / "local.pt", weights_only=True)
    saved["local"]["batches"] = {"seed": -1, "batches_drawn": 3}
    torch.save(saved, tmp_path / "local.pt")
    local = _local()
    peer = _peer(local, tmp_path)
    with caplog.at_level(logging.WARNING, logger="swarmtune.peer"):
        state = peer.initial_state()
    assert state.digest() == final.digest() and peer.resumed_from == ROUNDS
    assert not local.trainer.state_dict()["optimizer"]["state"]
    assert any("fresh moments" in r.getMessage() for r in caplog.records)
