"""Atomic per-round checkpoints in a volunteer's work dir.

Two files, each replaced atomically (write temp, fsync, rename): `state.safetensors` (the group
state, shared with peers) and `local.pt` (AdamW moments and data position, this peer only). A
crash between the two renames leaves a local file from the previous round, which is then ignored.
A file that cannot be read is renamed to `*.corrupt-<ns>*` (never deleted) with one warning; a
torn `local.pt` only costs the optimizer moments, the group state is kept.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from swarmtune.node.engine.state import GroupState, StateError, decode_state, encode_state

log = logging.getLogger("swarmtune.checkpoint")
_TEMP_MARK = ".tmp-"


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that `path` holds either its old or its new content, never a mix."""
    tmp = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Checkpoint:
    """Save and restore (group state, local trainer state) under one work dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.workdir / "state.safetensors"
        self.local_path = self.workdir / "local.pt"
        remove_dead_temps(self.workdir)

    def save(self, state: GroupState, local: Mapping[str, Any]) -> float:
        """Write both files atomically; returns seconds spent."""
        started = time.perf_counter()
        atomic_write(self.state_path, encode_state(state))
        buffer = io.BytesIO()
        torch.save({"round": state.round, "local": dict(local)}, buffer)
        atomic_write(self.local_path, buffer.getvalue())
        return time.perf_counter() - started

    def load(
        self,
        expect: Mapping[str, torch.Size],
        check: Callable[[GroupState], None] | None = None,
    ) -> tuple[GroupState, dict[str, Any] | None] | None:
        """The last checkpoint, or None; a corrupt one, or one `check` refuses (StateError), is
        set aside (renamed), never deleted."""
        if not self.state_path.exists():
            return None
        try:
            state = decode_state(self.state_path.read_bytes(), expect)
            if check is not None:
                check(state)
        except StateError as exc:
            set_aside(self.state_path, f"is unusable ({exc})")
            return None
        return state, self._load_local(state.round)

    def _load_local(self, round_: int) -> dict[str, Any] | None:
        """Our moments and data position saved with `round_`; None if absent, stale or torn."""
        if not self.local_path.exists():
            return None
        try:
            # weights_only: plain containers, numbers and tensors; no code runs while unpickling
            saved = torch.load(self.local_path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or not isinstance(saved.get("local"), dict):
                raise ValueError("not a swarmtune local.pt")
        except Exception as exc:  # noqa: BLE001 - a torn file fails to unpickle in many ways
            set_aside(self.local_path, f"is unreadable ({type(exc).__name__}), moments restart")
            return None
        if saved.get("round") != round_:
            return None  # from the round before a crash between the two renames
        return saved["local"]


def set_aside(path: Path, why: str) -> Path:
    """Rename a bad checkpoint file next to itself (name.corrupt-<ns>.suffix), with a warning."""
    aside = path.with_name(f"{path.stem}.corrupt-{time.time_ns()}{path.suffix}")
    path.rename(aside)
    log.warning("%s %s; moved to %s", path, why, aside.name)
    return aside


def remove_dead_temps(workdir: Path) -> list[Path]:
    """Delete temp files that a killed process left mid-write (their writer pid is gone)."""
    removed = []
    for tmp in workdir.glob(f".*{_TEMP_MARK}*"):
        pid = tmp.name.rsplit(_TEMP_MARK, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
