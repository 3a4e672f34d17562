"""Atomic per-round checkpoints in a volunteer's work dir.

Two files, each replaced atomically (write temp, fsync, rename): `state.safetensors` (the group
state, shared with peers) and `local.pt` (AdamW moments and data position, this peer only). A
crash between the two renames leaves a local file from the previous round, which is then ignored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from node.state import GroupState, StateError, decode_state, encode_state

log = logging.getLogger("swarmtune.checkpoint")


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that `path` holds either its old or its new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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

    def save(self, state: GroupState, local: Mapping[str, Any]) -> float:
        """Write both files atomically; returns seconds spent."""
        started = time.perf_counter()
        atomic_write(self.state_path, encode_state(state))
        buffer = _to_bytes({"round": state.round, "local": dict(local)})
        atomic_write(self.local_path, buffer)
        return time.perf_counter() - started

    def load(
        self, expect: Mapping[str, torch.Size]
    ) -> tuple[GroupState, dict[str, Any] | None] | None:
        """The last checkpoint, or None; a corrupt one is set aside (renamed), never deleted."""
        if not self.state_path.exists():
            return None
        try:
            state = decode_state(self.state_path.read_bytes(), expect)
        except StateError as exc:
            aside = self.state_path.with_name(f"state.corrupt-{int(time.time())}.safetensors")
            self.state_path.rename(aside)
            log.warning("checkpoint %s is unusable (%s); moved to %s", self.state_path, exc, aside)
            return None
        return state, self._load_local(state.round)

    def _load_local(self, round_: int) -> dict[str, Any] | None:
        if not self.local_path.exists():
            return None
        try:
            saved = torch.load(self.local_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a torn local file only costs optimizer moments
            log.warning(
                "local optimizer state %s unreadable (%s); starting fresh moments",
                self.local_path,
                type(exc).__name__,
            )
            return None
        if saved.get("round") != round_:
            return None
        return saved["local"]


def _to_bytes(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
