"""What the coordinator remembers of a run for its status page and logs: one point per peer
round, bounded in memory (`max_points`) and on disk (history.jsonl, rewritten from memory once
it holds twice that), and reloaded after a restart so that the curves survive it."""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swarmtune.node.engine.checkpoint import atomic_write
from swarmtune.protocols.records import PeerRecord

log = logging.getLogger("swarmtune.watch")
MAX_POINTS = 20_000  # ~100 volunteers x 200 rounds; a point is ~400 bytes as JSON
FILE_NAME = "history.jsonl"
COUNTERS = ("fallbacks", "rejections", "exclusions", "resyncs", "unproven", "banned", "refused")
TIMES = ("inner_s", "matchmaking_s", "transfer_s", "wall_s")


def round_point(record: PeerRecord, now: float, previous: Mapping[str, Any] | None) -> dict:
    """The point a peer's record gives for its newest round; `bytes` is the traffic since the
    previous point (None when there is none, or when the peer restarted and its totals reset)."""
    total = record.bytes_sent + record.bytes_received
    traffic = None
    if previous is not None and total >= previous["total_bytes"]:
        traffic = total - previous["total_bytes"]
    point = {
        "t": round(now, 3),
        "peer": record.peer_id,
        "task": record.task,
        "cluster": record.cluster,
        "round": record.round,
        "loss": record.loss,
        "eval_loss": record.eval_loss,
        "eval_exact": record.eval_exact,
        "group_size": record.group_size,
        "outcome": record.outcome,
        "tau": record.tau,
        "bytes": traffic,
        "total_bytes": total,
    }
    point.update({name: getattr(record, name) for name in TIMES + COUNTERS})
    return point


class History:
    """Per-round points of every volunteer the coordinator has seen, oldest first."""

    def __init__(self, path: Path | None, max_points: int = MAX_POINTS) -> None:
        self.path = path
        self.max_points = max_points
        self.points: deque[dict] = deque(maxlen=max_points)
        self.last: dict[str, dict] = {}  # newest point of each peer
        self.lines_on_disk = 0
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        skipped = 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                point = json.loads(line)
                peer, round_ = point["peer"], int(point["round"])
            except (ValueError, KeyError, TypeError):
                skipped += 1  # e.g. the half line a crash left behind
                continue
            self.points.append(point)
            if round_ >= self.last.get(peer, {}).get("round", -1):
                self.last[peer] = point
            self.lines_on_disk += 1
        if skipped:
            log.warning("history: skipped %d unreadable line(s) of %s", skipped, path)

    def observe(self, records: Mapping[str, PeerRecord], now: float) -> list[dict]:
        """Add a point for every volunteer whose round moved since we last looked."""
        new = []
        for peer, record in sorted(records.items()):
            previous = self.last.get(peer)
            if record.role != "volunteer" or record.loss is None or record.round == 0:
                continue
            if previous is not None and previous["round"] == record.round:
                continue
            point = round_point(record, now, previous)
            self.last[peer] = point
            new.append(point)
        self.points.extend(new)
        if new and self.path is not None:
            self._save(new)
        return new

    def _save(self, new: list[dict]) -> None:
        assert self.path is not None
        if self.lines_on_disk + len(new) > 2 * self.max_points:
            lines = [json.dumps(p) + "\n" for p in self.points]
            atomic_write(self.path, "".join(lines).encode())
            self.lines_on_disk = len(lines)
            return
        with open(self.path, "a") as handle:
            handle.writelines(json.dumps(p) + "\n" for p in new)
        self.lines_on_disk += len(new)
