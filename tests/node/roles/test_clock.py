"""The simulator's clock: a small round worked by hand, the draws, churn, and its rows."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from swarmtune.node.config import ClockSettings, ConfigError, SimConfig, load_sim_config
from swarmtune.node.roles.clock import Clock, Profile, draw_profiles, round_time
from swarmtune.node.roles.simulate import Simulation

MB = 1_000_000


def test_a_round_of_three_matches_the_hand_computed_seconds_and_bytes() -> None:
    # H = 10 steps at 0.1, 0.2 and 0.4 s: in after 1.0 + 0.05, 2.0 + 0.05 and 4.0 + 0.05 s;
    # with a 5 s window from the first (1.05 s) the group closes when the last is in, 4.05 s.
    # Blobs of 1 MB, 2 fetchers each: the providers' uplinks (1, 2, 4 MB/s) serve 2 MB in
    # 2.0, 1.0 and 0.5 s; the downlinks (4, 4, 1 MB/s) take 2 MB in 0.5, 0.5 and 2.0 s.
    #   member 0: max(0.5, slowest other provider 1.0) + 0.05 = 1.05
    #   member 1: max(0.5, 2.0) + 0.05 = 2.05
    #   member 2: max(2.0, 2.0) + 0.05 = 2.05
    # round = 4.05 + 2.05 = 6.10 s; each member sends and receives 2 MB: 4 MB
    members = [
        Profile(0.1, 1 * MB, 4 * MB, 0.05),
        Profile(0.2, 2 * MB, 4 * MB, 0.05),
        Profile(0.4, 4 * MB, 1 * MB, 0.05),
    ]
    spent = round_time(members, 10, MB, window_s=5.0, no_show=False)
    assert (spent.members, spent.missed, spent.bytes_per_member) == (3, 0, 4 * MB)
    assert spent.compute_s == pytest.approx(4.05) and spent.waited_s == 0
    assert spent.exchange_s == pytest.approx(2.05)
    assert spent.wall_s == pytest.approx(6.10)
    # a member that left since the last round is waited for until the window runs out:
    # the group closes at 1.05 + 5 = 6.05 s, 2.0 s after the last member came; 6.05 + 2.05
    gone = round_time(members, 10, MB, 5.0, no_show=True)
    assert gone.waited_s == pytest.approx(2.0) and gone.wall_s == pytest.approx(8.10)
    # a 2 s window closes the group at 3.05 s: member 2 (4.05 s) misses it. The other two
    # exchange 1 MB each: member 0 max(1/4, 1/2) + 0.05 = 0.55, member 1 max(1/4, 1/1) + 0.05
    # = 1.05; round = 3.05 + 1.05 = 4.10 s, 2 MB per member
    short = round_time(members, 10, MB, 2.0, no_show=False)
    assert (short.members, short.missed, short.bytes_per_member) == (2, 1, 2 * MB)
    assert short.admitted == (0, 1) and spent.admitted == (0, 1, 2)
    assert short.compute_s == pytest.approx(2.05) and short.waited_s == pytest.approx(1.0)
    assert short.exchange_s == pytest.approx(1.05) and short.wall_s == pytest.approx(4.10)
    # the slowest provider does not wait on its own uplink: member 0 serves in 1 s but its own
    # fetch takes 0.5 + 0.01; member 1 waits 0 + 1.0. Counting its own uplink would make
    # member 0's 0.5 + 1.0 the round's exchange
    apart = [Profile(0.1, 1 * MB, 100 * MB, 0.5), Profile(0.1, 100 * MB, 100 * MB, 0.0)]
    assert round_time(apart, 1, MB, 5.0, False).exchange_s == pytest.approx(1.0)
    # a lone member waits out its window and exchanges nothing
    alone = round_time(members[:1], 10, MB, 5.0, False)
    assert (alone.members, alone.waited_s, alone.bytes_per_member) == (1, 5.0, 0)


def test_bytes_per_member_grow_with_the_group_in_one_group_of_everyone() -> None:
    profile = Profile(0.1, 5 * MB, 10 * MB, 0.05)
    sizes = [round_time([profile] * g, 10, MB, 5.0, False).bytes_per_member for g in (4, 16, 64)]
    assert sizes == [2 * 3 * MB, 2 * 15 * MB, 2 * 63 * MB]


def test_profiles_are_seeded_and_follow_the_stated_distributions() -> None:
    settings = ClockSettings(
        step_s=0.2, speed_spread=10, up_mbps=40, down_mbps=80, rtt_ms=(20, 200)
    )
    a, b = draw_profiles(2000, settings, 1), draw_profiles(2000, settings, 1)
    assert a == b and a != draw_profiles(2000, settings, 2)
    steps = [p.step_s for p in a]
    assert min(steps) >= 0.2 and max(steps) <= 2.0
    # log-uniform: the median step is sqrt(10) x the fastest (within sampling error)
    assert statistics.median(steps) == pytest.approx(0.2 * math.sqrt(10), rel=0.1)
    # log-normal links: the medians are the configured ones (40 and 80 Mbit/s, in bytes/s)
    assert statistics.median(p.up for p in a) == pytest.approx(40e6 / 8, rel=0.1)
    assert statistics.median(p.down for p in a) == pytest.approx(80e6 / 8, rel=0.1)
    assert all(0.02 <= p.rtt_s <= 0.2 for p in a)


def test_churn_takes_volunteers_out_and_brings_them_back_and_flags_the_no_show() -> None:
    clock = Clock(200, ClockSettings(churn=0.2, back=0.5), window_s=5.0, seed=0)
    seen_gone, came_back = [], 0
    for _ in range(20):
        before = set(clock.gone)
        clock.churn()
        came_back += len(before - clock.gone)
        assert clock.no_show == bool(clock.gone - before)
        seen_gone.append(len(clock.gone))
    # steady state: gone = live x 0.2 / 0.5, a share of 0.2 / 0.7 of 200 (about 57)
    assert 35 < statistics.mean(seen_gone[5:]) < 80 and came_back > 0
    assert clock.present(range(200)) == [c for c in range(200) if c not in clock.gone]
    still = Clock(50, ClockSettings(), 5.0, 0)
    still.churn()
    assert not still.gone and not still.no_show


def test_bad_clock_settings_are_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("clock: {rtt_ms: [200, 20]}\n")
    with pytest.raises(ConfigError, match="rtt_ms") as caught:
        load_sim_config(path)
    assert "\n" not in str(caught.value)


def test_a_simulation_with_a_clock_reports_seconds_and_bytes_per_round() -> None:
    torch.set_num_threads(1)
    config = SimConfig.model_validate(
        {
            "run": {"inner": {"steps": 2, "batch_size": 2, "seq_len": 16}},
            "clients": 3,
            "participation": 1.0,
            "rounds": 2,
            "texts_per_client": 20,
            "eval_batches": 1,
            "clock": {"up_mbps": 8, "down_mbps": 16, "link_sigma": 0},
        }
    )
    sim = Simulation(config, seed=0)
    size = sim.blob_bytes
    params = sum(v.numel() for v in sim.state.params.values())
    assert 4 * params < size < 4 * params + 64 * 1024  # fp32 values and a header
    rows = [sim.step(), sim.step()]
    assert [r["members"] for r in rows] == [3, 3]
    assert all(r["bytes_per_member"] == 2 * 2 * size for r in rows)
    # links of 1 and 2 MB/s for everyone: 2 blobs through a 1 MB/s uplink, plus one round trip
    for r in rows:
        assert 2 * size / 1e6 <= r["exchange_s"] <= 2 * size / 1e6 + 0.2
        assert r["round_s"] == pytest.approx(r["compute_s"] + r["waited_s"] + r["exchange_s"])
    assert rows[1]["wall_s"] == pytest.approx(rows[0]["round_s"] + rows[1]["round_s"])
