"""`--report-to tensorboard`: per-round scalars as TensorBoard event files in the work dir
(`tensorboard --logdir WORKDIR/tensorboard`). metrics.jsonl is written either way."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from swarmtune.protocols.swarm import SwarmError

REPORT_TO = ("tensorboard",)
LOG_DIR = "tensorboard"


class ScalarLog:
    """Writes named scalars at a step (the round) and flushes, so a live TensorBoard sees them."""

    def __init__(self, workdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SwarmError(
                "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
            ) from None
        self.logdir = workdir / LOG_DIR
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def write(self, step: int, scalars: Mapping[str, float | int | None]) -> None:
        """Add every scalar that is set; skip None (e.g. no eval this round)."""
        for tag, value in sorted(scalars.items()):
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def round_scalars(report: Any) -> dict[str, float | int | None]:
    """A volunteer's scalars for one round (a node.engine.round.RoundReport)."""
    wall = report.wall_s
    return {
        "loss/inner_mean": report.loss_mean,
        "loss/inner_last": report.loss_last,
        "loss/eval": report.eval_loss,
        "eval/exact_match": report.eval_exact,
        "time/inner_s": report.inner_s,
        "time/matchmaking_s": report.matchmaking_s,
        "time/transfer_s": report.transfer_s,
        "time/outer_s": report.outer_s,
        "time/wall_s": wall,
        "time/utilization": report.inner_s / wall if wall > 0 else None,
        "bytes/sent": report.bytes_sent,
        "bytes/received": report.bytes_received,
        "group/size": report.group_size,
        "group/averaged": int(report.outcome == "averaged"),
        "ghbm/tau": report.tau,
    }


def peer_scalars(point: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The coordinator's per-peer scalars of one history point (tags end in the peer's id)."""
    name = point["peer"][-8:]
    return {
        f"peer_eval/{name}": point.get("eval_loss"),
        f"peer_exact/{name}": point.get("eval_exact"),
        f"peer_loss/{name}": point.get("loss"),
    }


def round_aggregates(points: Iterable[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """Swarm-wide scalars of one round's history points: mean eval per cluster, mean
    utilization, summed bytes and the number of volunteers that reported it."""
    groups: dict[str, list[float]] = defaultdict(list)
    scalars: dict[str, float | int | None] = {"swarm/volunteers": 0}
    for p in points:
        scalars["swarm/volunteers"] = int(scalars["swarm/volunteers"] or 0) + 1
        if p.get("eval_loss") is not None:
            cluster = "run-wide" if p["cluster"] < 0 else f"cluster-{p['cluster']}"
            groups[f"cluster_eval/{cluster}"].append(p["eval_loss"])
        if p.get("wall_s"):
            groups["swarm/utilization"].append(p["inner_s"] / p["wall_s"])
        if p.get("bytes") is not None:
            scalars["swarm/bytes"] = float(scalars.get("swarm/bytes") or 0.0) + p["bytes"]
    scalars.update({tag: sum(v) / len(v) for tag, v in groups.items()})
    return scalars


class SwarmLog:
    """The coordinator's swarm-wide view: per-peer scalars as points arrive; a round's
    aggregates once the newest round is LAG rounds past it (so late reporters are counted)."""

    LAG = 2

    def __init__(self, workdir: Path) -> None:
        self.log = ScalarLog(workdir)
        self.written_through = 0  # rounds up to this one have their aggregates written

    def add(self, new: Iterable[Mapping[str, Any]], history: Iterable[Mapping[str, Any]]) -> None:
        """Log the new points, and the aggregates of rounds that are now complete enough."""
        for point in new:
            self.log.write(point["round"], peer_scalars(point))
        self.flush(history, final=False)

    def flush(self, history: Iterable[Mapping[str, Any]], final: bool = True) -> None:
        """Write the aggregates of every round not yet written (all of them when final)."""
        by_round: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
        for point in history:
            if point["round"] > self.written_through:
                by_round[point["round"]].append(point)
        newest = max(by_round, default=0)
        for round_ in sorted(by_round):
            if not final and round_ > newest - self.LAG:
                break
            self.log.write(round_, round_aggregates(by_round[round_]))
            self.written_through = round_

    def close(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Write what is left and close."""
        self.flush(history, final=True)
        self.log.close()
