"""Overlapped rounds: each exchange in flight while the next inner phase computes.

The group must still end bit-identical, with synchronous members too; the overlapped compute
must start from the eager point (checked against the closed form of a first Nesterov step);
resyncs and restarts must keep working.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from swarmtune.node.config import SimConfig, parse_config
from swarmtune.node.engine.peer import Peer
from swarmtune.node.engine.round import RoundReport
from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.transport import InMemoryHub, InMemoryTransport, MemberMeta
from swarmtune.node.roles.simulate import Simulation
from tests.node.engine.test_round import TASKS, _local, _peer, _run_all

OVERLAP = parse_config(
    {
        "inner": {"steps": 4, "batch_size": 4, "seq_len": 32},
        "averaging": {"overlap": True},
        "outer": {"name": "nesterov", "lr": 0.7, "momentum": 0.9},
    }
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_overlapped_peers_agree_and_loss_falls() -> None:
    hub = InMemoryHub(expected=3)
    locals_ = [_local(task, i) for i, task in enumerate(TASKS)]
    before = [local.eval_loss() for local in locals_]
    reports: list[RoundReport] = []
    peers = [
        _peer(hub, f"p{i}", lo, reports=reports, config=OVERLAP) for i, lo in enumerate(locals_)
    ]
    states = _run_all(peers, [4, 4, 4])
    assert len({s.digest() for s in states}) == 1 and states[0].round == 4
    assert len(reports) == 12 and all(r.verified and r.group_size == 3 for r in reports)
    assert all(r.overlapped for r in reports)
    # the last round computes nothing new: its wall time holds no inner compute
    assert all(r.inner_s == 0.0 for r in reports if r.round == 3)
    assert all(r.inner_s > 0.0 for r in reports if r.round < 3)
    after = [local.eval_loss() for local in locals_]
    assert sum(after) < sum(before)
    p0, p2 = locals_[0].trainer.get_params(), locals_[2].trainer.get_params()
    assert all(torch.equal(p0[k], p2[k]) for k in p0)


def test_overlapped_and_synchronous_members_average_together() -> None:
    hub = InMemoryHub(expected=3)
    reports: list[RoundReport] = []
    peers = [
        _peer(hub, f"p{i}", _local(t, i), reports=reports, config=OVERLAP)
        for i, t in enumerate(TASKS)
    ]
    peers[2].overlap = False
    states = _run_all(peers, [3, 3, 3])
    assert len({s.digest() for s in states}) == 1 and states[0].round == 3
    assert all(r.verified and r.group_size == 3 for r in reports)
    assert sorted(r.overlapped for r in reports) == [False] * 3 + [True] * 6


class _Recording(InMemoryTransport):
    """Keeps every (meta, delta) this member offered."""

    def __init__(self, hub: InMemoryHub, peer: str) -> None:
        super().__init__(hub, peer)
        self.sent: list[tuple[MemberMeta, dict[str, torch.Tensor]]] = []

    def exchange(self, delta, meta, ahead=0.0):  # noqa: ANN001, ANN201 - Transport's signature
        self.sent.append((meta, {k: v.clone() for k, v in delta.items()}))
        return super().exchange(delta, meta, ahead)


def test_the_overlapped_compute_starts_from_the_eager_point_and_joins_the_next_round() -> None:
    hub = InMemoryHub(expected=2)
    locals_ = [_local(t, i) for i, t in enumerate(TASKS[:2])]
    transports = [_Recording(hub, f"p{i}") for i in range(2)]
    starts: list[dict[str, torch.Tensor]] = []  # p0's parameters when each compute begins
    trainer = locals_[0].trainer
    train_steps = trainer.train_steps

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        starts.append(trainer.get_params())
        return train_steps(*args, **kwargs)

    trainer.train_steps = recorded  # type: ignore[method-assign]
    reports: list[RoundReport] = []
    peers = [
        Peer(lo.trainer, tr, OVERLAP, on_report=reports.append if i == 0 else None)
        for i, (lo, tr) in enumerate(zip(locals_, transports, strict=True))
    ]
    initial = peers[0].initial_state()
    _run_all(peers, [2, 2])
    sent = transports[0].sent
    assert [m.round for m, _ in sent] == [0, 1] and len(starts) == 2
    assert sent[0][0].start_digest == initial.digest()
    # round 2's contribution names the state round 1 concluded (what it is applied to) ...
    assert sent[1][0].start_digest == reports[0].digest
    # ... and was computed from theta^0 - lr (Delta_1 + mu Delta_1): the first Nesterov step
    # (buffer seeded with Delta, as torch SGD does) with p0's own Delta_1 for the aggregate
    lr, mu = 0.7, 0.9
    for k, theta in initial.params.items():
        own = sent[0][1][k]
        expected = theta - lr * (own + mu * own)
        scale = max(float(theta.abs().max()), float(own.abs().max()), 1e-3)
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(starts[1][k], expected, rtol=0, atol=8 * eps * scale)
    # and its Delta is measured from there, not from the concluded state
    assert not all(torch.equal(starts[1][k], initial.params[k]) for k in initial.params)


def test_an_overlapped_member_that_diverged_resyncs_and_the_group_agrees_again() -> None:
    hub = InMemoryHub(expected=3, timeout=1.5, hidden={1: ("p0", "p1")})
    reports: list[RoundReport] = []
    peers = [
        _peer(hub, f"p{i}", _local(t, i), reports=reports, config=OVERLAP)
        for i, t in enumerate(TASKS)
    ]
    states = _run_all(peers, [4, 4, 4])
    p0_round1 = [r for r in reports if r.round == 1 and r.members == ("p0", "p2")]
    assert len(p0_round1) == 1 and p0_round1[0].excluded == ("p1",)
    assert len({s.digest() for s in states}) == 1
    assert peers[0].counts.resyncs >= 1 and sum(p.counts.resyncs for p in peers[1:]) == 0
    # the divergence stays visible in p0's later reports
    last = max((r for r in reports if r.resyncs), key=lambda r: r.round)
    assert last.exclusions >= 1


def test_an_overlapped_peer_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    hub = InMemoryHub(expected=2, timeout=3.0)
    peers = [
        _peer(hub, f"p{i}", _local(t, i), tmp_path / f"p{i}", config=OVERLAP)
        for i, t in enumerate(TASKS[:2])
    ]
    _run_all(peers, [2, 2])
    reborn = _peer(hub, "p1", _local(TASKS[1], 1), tmp_path / "p1", config=OVERLAP)
    states = _run_all([peers[0], reborn], [2, 2])
    assert reborn.resumed_from == 2
    assert len({s.digest() for s in states}) == 1 and states[0].round == 4


def test_stop_during_an_exchange_in_flight_abandons_the_round() -> None:
    hub = InMemoryHub(expected=2, timeout=30.0)  # nobody else comes: the exchange hangs
    stop = threading.Event()
    peer = Peer(_local("dates", 0).trainer, InMemoryTransport(hub, "p0"), OVERLAP, stop=stop)
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    state = peer.run(3)
    timer.cancel()
    assert isinstance(state, GroupState) and state.round == 0


def test_simulated_overlap_uses_the_eager_point_of_returning_clients() -> None:
    def config(overlap: bool) -> SimConfig:
        run = OVERLAP.model_dump(mode="json")
        run["averaging"]["overlap"] = overlap
        return SimConfig.model_validate(
            {
                "run": run,
                "clients": 3,
                "participation": 1.0,
                "rounds": 2,
                "tasks": TASKS,
                "texts_per_client": 20,
                "eval_batches": 1,
            }
        )

    sim = Simulation(config(True), 0)
    seen: dict[str, list[tuple[dict, dict]]] = {c.name: [] for c in sim.clients}  # (origin, final)

    def observer(name: str):  # noqa: ANN202
        return lambda origin, final: seen[name].append(
            ({k: v.clone() for k, v in origin.items()}, {k: v.clone() for k, v in final.items()})
        )

    for client in sim.clients:
        sim.observers[client.name] = observer(client.name)
    rows = sim.run().rows
    assert all(r.outcome == "averaged" for r in sim.reports)
    # round 1 starts every client from the shared state ...
    theta = seen["c0"][0][0]
    assert all(torch.equal(seen[c][0][0][k], theta[k]) for c in seen for k in theta)
    # ... round 2 from each client's own eager point: theta^0 - lr (1 + mu) Delta_1 (a first
    # Nesterov step), where Delta_1 = theta^0 - its own round-1 end point
    lr, mu = 0.7, 0.9
    eps = torch.finfo(torch.float32).eps
    for (origin0, final0), (origin1, _), *_ in seen.values():
        for k in theta:
            own = origin0[k] - final0[k]
            expected = theta[k] - lr * (1 + mu) * own
            scale = max(float(theta[k].abs().max()), float(own.abs().max()), 1e-3)
            torch.testing.assert_close(origin1[k], expected, rtol=0, atol=16 * eps * scale)
    sync = Simulation(config(False), 0).run().rows
    assert sync[1] == rows[1] and sync[2] != rows[2]  # round 1 the same, then they differ
