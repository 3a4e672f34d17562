"""The coordinator's round history: one point per peer round, bounded, surviving a restart."""

from __future__ import annotations

import json
from pathlib import Path

from swarmtune.node.watch.history import History
from swarmtune.protocols.records import PeerRecord


def _record(peer: str, round_: int, sent: int = 0, role: str = "volunteer") -> PeerRecord:
    return PeerRecord(
        peer_id=peer * 12,
        role=role,  # type: ignore[arg-type]
        round=round_,
        loss=2.0 - 0.1 * round_,
        eval_loss=2.1 - 0.1 * round_,
        bytes_sent=sent,
        bytes_received=sent,
        inner_s=1.0,
        wall_s=2.0,
        outcome="averaged",
    )


def test_a_point_per_peer_round_with_the_traffic_since_the_last_one(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    a, b = "a" * 12, "b" * 12
    assert len(history.observe({a: _record("a", 1, 100), b: _record("b", 1, 50)}, 10.0)) == 2
    # the same rounds again add nothing; a coordinator and a peer that did no round are skipped
    coordinator = _record("c", 0, role="coordinator").model_copy(update={"loss": None})
    assert history.observe({a: _record("a", 1, 100), "c" * 12: coordinator}, 11.0) == []
    new = history.observe({a: _record("a", 2, 350), b: _record("b", 1, 50)}, 12.0)
    assert [(p["peer"], p["round"], p["bytes"]) for p in new] == [(a, 2, 500)]  # 2*(350-100)
    first_a = history.points[0]
    assert first_a["bytes"] is None and first_a["eval_loss"] == 2.0 and first_a["t"] == 10.0
    # a restarted peer's totals start again from zero: no negative traffic
    restarted = history.observe({a: _record("a", 3, 10)}, 13.0)
    assert restarted[0]["bytes"] is None


def test_a_restart_reloads_the_points_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history = History(path)
    for r in range(1, 5):
        history.observe({"a" * 12: _record("a", r)}, float(r))
    with open(path, "a") as handle:
        handle.write('{"peer": "aaaa", "rou')  # a crash mid-line
    again = History(path)
    assert [p["round"] for p in again.points] == [1, 2, 3, 4]
    assert again.observe({"a" * 12: _record("a", 4)}, 9.0) == []  # no duplicate after restart
    assert [p["round"] for p in again.observe({"a" * 12: _record("a", 5)}, 9.0)] == [5]


def test_memory_and_disk_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history = History(path, max_points=10)
    for r in range(1, 60):
        history.observe({"a" * 12: _record("a", r), "b" * 12: _record("b", r)}, float(r))
        lines = path.read_text().splitlines()
        assert len(history.points) <= 10 and len(lines) <= 20
    assert [p["round"] for p in history.points][-2:] == [59, 59]
    reloaded = History(path, max_points=10)
    assert list(reloaded.points) == list(history.points)
    assert all(json.loads(line)["round"] >= 50 for line in lines)
