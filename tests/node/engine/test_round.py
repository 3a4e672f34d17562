"""Several peers on the in-memory transport, sharing every line of round code with the daemon."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

from swarmtune.node.config import RunConfig, max_round_weight, parse_config
from swarmtune.node.engine.checkpoint import Checkpoint
from swarmtune.node.engine.peer import Peer
from swarmtune.node.engine.round import (
    RoundReport,
    combine,
    group_context,
    inner_phase,
    round_start,
    select_contributions,
)
from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.transport import (
    AveragingFailed,
    GroupResult,
    InMemoryHub,
    InMemoryTransport,
    MemberMeta,
)
from swarmtune.node.local.build import LocalModel, build_local_model

CONFIG = parse_config(
    {"inner": {"steps": 4, "batch_size": 4, "seq_len": 32}, "averaging": {"codec": "fp32"}}
)
TASKS = ["arithmetic", "dates", "code"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _local(task: str, seed: int) -> LocalModel:
    return build_local_model(CONFIG, f"builtin:{task}", data_seed=seed)


def _peer(
    hub: InMemoryHub,
    name: str,
    local: LocalModel,
    workdir: Path | None = None,
    reports: list[RoundReport] | None = None,
    config: RunConfig = CONFIG,
) -> Peer:
    sink = reports.append if reports is not None else None
    return Peer(
        local.trainer,
        InMemoryTransport(hub, name),
        config,
        Checkpoint(workdir) if workdir else None,
        on_report=sink,
    )


def _run_all(peers: list[Peer], rounds: list[int]) -> list:
    results: list = [None] * len(peers)

    def work(i: int) -> None:
        results[i] = peers[i].run(rounds[i], settle_s=2.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a peer thread did not finish"
    return results


def test_three_peers_agree_and_loss_falls() -> None:
    hub = InMemoryHub(expected=3)
    locals_ = [_local(task, i) for i, task in enumerate(TASKS)]
    before = [local.eval_loss() for local in locals_]
    reports: list[RoundReport] = []
    peers = [_peer(hub, f"p{i}", local, reports=reports) for i, local in enumerate(locals_)]
    states = _run_all(peers, [3, 3, 3])
    assert len({s.digest() for s in states}) == 1 and states[0].round == 3
    assert all(r.group_size == 3 and r.verified for r in reports)
    after = [local.eval_loss() for local in locals_]
    assert sum(after) < sum(before)
    # the adapters really are the same tensors, not just the same digest
    p0, p1 = locals_[0].trainer.get_params(), locals_[1].trainer.get_params()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)


def test_a_contribution_lost_for_everyone_is_excluded_and_the_rest_agree() -> None:
    hub = InMemoryHub(expected=3, lost={1: {"p2"}})
    reports: list[RoundReport] = []
    peers = [_peer(hub, f"p{i}", _local(t, i), reports=reports) for i, t in enumerate(TASKS)]
    states = _run_all(peers, [3, 3, 3])
    assert len([r for r in reports if r.round == 1]) == 3
    # p0 and p1 average without p2; p2 still has its own and diverges, then resyncs
    round1 = [r for r in reports if r.round == 1]
    without = [r for r in round1 if r.members == ("p0", "p1")]
    assert len(without) == 2 and all(r.excluded == ("p2",) for r in without)
    assert [r.members for r in round1 if r not in without] == [("p0", "p1", "p2")]
    assert len({s.digest() for s in states}) == 1  # p2 resynced to the others afterwards
    assert [len(p.resynced_to) for p in peers] == [0, 0, 1]
    # the failure stays visible in every later report, not hidden by the resync
    last = sorted((r for r in reports if r.round == 2), key=lambda r: r.resyncs)
    assert [(r.exclusions, r.resyncs) for r in last] == [(1, 0), (1, 0), (0, 1)]
    assert all(r.outcome == "averaged" and r.group_size == 3 for r in last)


def test_a_contribution_one_member_misses_makes_it_diverge_visibly_then_resync() -> None:
    hub = InMemoryHub(expected=3, hidden={1: ("p0", "p1")})
    reports: list[RoundReport] = []
    peers = [_peer(hub, f"p{i}", _local(t, i), reports=reports) for i, t in enumerate(TASKS)]
    states = _run_all(peers, [3, 3, 3])
    p0_round1 = [r for r in reports if r.round == 1 and r.members == ("p0", "p2")]
    assert len(p0_round1) == 1 and p0_round1[0].excluded == ("p1",)
    assert len({s.digest() for s in states}) == 1
    assert sum(len(p.resynced_to) for p in peers) == 1  # p0 adopts the majority's state
    final = [r for r in reports if r.round == 2]
    assert sum(r.resyncs for r in final) == 1 and sum(r.exclusions for r in final) == 1


def test_a_stale_member_is_kept_out_and_does_not_void_the_round() -> None:
    # p2 holds an old state of another round (like a peer that was SIGSTOPped): it must form
    # its own group, not join (and void) the round of the two healthy members.
    hub = InMemoryHub(expected=2, timeout=1.5)
    reports: list[RoundReport] = []
    peers = [_peer(hub, f"p{i}", _local(t, i), reports=reports) for i, t in enumerate(TASKS)]
    _run_all(peers[:2], [1, 1])
    hub.expected = 3
    fresh = peers[2].initial_state()
    stale = GroupState(0, {k: v + 0.01 for k, v in fresh.params.items()})
    threads = [threading.Thread(target=peers[i].run, args=(1, 0.0)) for i in range(2)]
    for t in threads:
        t.start()
    peers[2].boundary = lambda state: (state, False)  # type: ignore[method-assign]  # no sync
    _, stale_report = peers[2].one_round(stale)
    for t in threads:
        t.join(timeout=120)
    healthy = [r for r in reports if r.round == 1]
    assert len(healthy) == 2 and all(r.outcome == "averaged" for r in healthy)
    assert all(r.members == ("p0", "p1") and r.excluded == () for r in healthy)
    assert stale_report.outcome == "no-group" and stale_report.group_size == 1


def test_group_continues_without_a_member_that_left() -> None:
    hub = InMemoryHub(expected=3, timeout=1.5)
    reports: list[list[RoundReport]] = [[], [], []]
    peers = [_peer(hub, f"p{i}", _local(t, i), reports=reports[i]) for i, t in enumerate(TASKS)]
    states = _run_all(peers, [3, 3, 1])
    assert states[0].round == states[1].round == 3
    assert states[0].digest() == states[1].digest()
    # the two that stayed averaged together in every round (a run of fallbacks that the final
    # resync papered over would end on one digest too)
    for mine in reports[:2]:
        assert [(r.outcome, r.group_size) for r in mine] == [
            ("averaged", 3),
            ("averaged", 2),
            ("averaged", 2),
        ], mine


def test_restarted_peer_resumes_from_checkpoint_and_catches_up(tmp_path: Path) -> None:
    hub = InMemoryHub(expected=3, timeout=1.5)
    peers = [_peer(hub, f"p{i}", _local(t, i), tmp_path / f"p{i}") for i, t in enumerate(TASKS)]
    _run_all(peers, [1, 1, 1])
    hub.expected = 2
    _run_all(peers[:2], [2, 2])  # p2 is "dead" meanwhile
    reborn = _peer(hub, "p2", _local("code", 2), tmp_path / "p2")
    hub.expected = 3
    states = _run_all([peers[0], peers[1], reborn], [1, 1, 1])
    assert reborn.resumed_from == 1 and reborn.resynced_to[0] == 3
    assert len({s.digest() for s in states}) == 1 and states[0].round == 4


def test_an_adopted_state_is_checkpointed_before_the_next_round(tmp_path: Path) -> None:
    # a peer stopped right after a resync restarts from the adopted state, not its own older one
    hub = InMemoryHub(expected=3, timeout=1.5)
    peers = [_peer(hub, f"p{i}", _local(t, i), tmp_path / f"p{i}") for i, t in enumerate(TASKS)]
    _run_all(peers, [1, 1, 1])
    hub.expected = 2
    _run_all([peers[0], peers[2]], [2, 2])  # p1 is "dead" meanwhile
    late = _peer(hub, "p1", _local(TASKS[1], 1), tmp_path / "p1")
    assert late.sync(late.initial_state()).round == 3 and late.resumed_from == 1
    again = _peer(hub, "p1", _local(TASKS[1], 1), tmp_path / "p1")
    assert again.initial_state().round == 3


def test_corrupt_checkpoint_is_set_aside_not_deleted(tmp_path: Path) -> None:
    hub = InMemoryHub(expected=1)
    (tmp_path / "state.safetensors").write_bytes(b"\x00garbage")
    peer = _peer(hub, "p0", _local("dates", 0), tmp_path)
    state = peer.initial_state()
    assert state.round == 0 and peer.resumed_from is None
    assert list(tmp_path.glob("state.corrupt-*.safetensors"))


def _meta(peer: str, weight: float, round_: int = 0, digest: str = "d") -> MemberMeta:
    return MemberMeta(peer, round_, digest, weight)


def test_contributions_are_chosen_by_round_state_arrival_and_weight() -> None:
    members = [
        _meta("a", 1.0),
        _meta("b", 3.0),
        _meta("c", 1.0, round_=1),
        _meta("d", 1.0, digest="other"),
        _meta("e", 0.0),
        _meta("f", 1.0),
        _meta("g", 1.0),
    ]
    contributions = {p: {"w": torch.zeros(1)} for p in "abcdeg"}
    group = GroupResult(members, contributions, {"g": "stream ended early"})
    chosen, excluded = select_contributions(group, members[0])
    assert [m.peer for m in chosen] == ["a", "b"]
    assert set(excluded) == {"c", "d", "e", "f", "g"}
    assert excluded["g"] == "stream ended early" and "no contribution" in excluded["f"]


def test_a_weight_above_what_one_round_can_produce_is_excluded_not_a_bigger_vote() -> None:
    members = [_meta("a", 100.0), _meta("b", 1e9)]
    group = GroupResult(members, {p: {"w": torch.zeros(1)} for p in "ab"})
    chosen, excluded = select_contributions(group, members[0], max_weight=4 * 4 * 32)
    assert [m.peer for m in chosen] == ["a"] and "weight" in excluded["b"]


def _chat_file(path: Path, answer: str) -> str:
    turns = [{"role": "user", "content": f"question {i}"} for i in range(40)]
    rows = [{"messages": [t, {"role": "assistant", "content": answer}]} for t in turns]
    path.write_text("".join(f"{json.dumps(r)}\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("weight", ["steps", "tokens"])
def test_a_members_weight_is_its_steps_unless_the_run_weighs_tokens(
    tmp_path: Path, weight: str
) -> None:
    """Two volunteers with chat data whose answers differ in length, completion-only loss:
    by default each weighs its H steps (equal work, equal say); `averaging.weight: tokens`
    weighs the tokens in its loss, and both bounds follow."""
    config = CONFIG.model_copy(
        update={"averaging": CONFIG.averaging.model_copy(update={"weight": weight})}
    )
    files = [_chat_file(tmp_path / "short.jsonl", "yes"), _chat_file(tmp_path / "long.jsonl",
             " ".join(["a much longer answer with many words"] * 3))]  # fmt: skip
    weights, tokens = [], []
    for i, data in enumerate(files):
        local = build_local_model(config, data, data_seed=i)
        state = GroupState(0, local.trainer.get_params(), {})
        update = inner_phase(state, round_start(state, config), local.trainer, f"p{i}", config)
        weights.append(update.meta.weight)
        tokens.append(update.inner.tokens)
    assert tokens[1] > 2 * tokens[0]  # the long answers really put more tokens in the loss
    if weight == "steps":
        assert weights == [config.inner.steps] * 2 == [max_round_weight(config)] * 2
    else:
        assert weights == [float(t) for t in tokens]
        inner = config.inner
        assert max_round_weight(config) == inner.steps * inner.batch_size * inner.seq_len


def _slowed(trainer: object, sleep_s: float) -> None:
    """Make `trainer` sleep `sleep_s` after each inner step (a slower device)."""
    train_steps = trainer.train_steps  # type: ignore[attr-defined]

    def sleepy(steps: int, after_step: object = None, deadline: float | None = None) -> object:
        def hook(j: int) -> None:
            if callable(after_step):
                after_step(j)
            time.sleep(sleep_s)

        return train_steps(steps, hook, deadline=deadline)

    trainer.train_steps = sleepy  # type: ignore[attr-defined]


def test_a_deadline_stops_a_slow_member_short_of_h_and_the_group_still_agrees() -> None:
    """`inner.deadline_s`: a member that sleeps 2 s after each step (a device ~50x slower)
    stops at the deadline with fewer steps; the fast ones train all H; everyone averages the
    step-normalised contributions and ends on one digest. Without a deadline a step always
    completes H (the trainer's own check)."""
    config = CONFIG.model_copy(
        update={"inner": CONFIG.inner.model_copy(update={"deadline_s": 5.0, "steps": 4})}
    )
    hub = InMemoryHub(expected=3)
    locals_ = [build_local_model(config, f"builtin:{t}", data_seed=i) for i, t in enumerate(TASKS)]
    _slowed(locals_[2].trainer, 2.0)
    reports: list[RoundReport] = []
    peers = [
        _peer(hub, f"p{i}", lo, reports=reports, config=config) for i, lo in enumerate(locals_)
    ]
    finals = _run_all(peers, [1, 1, 1])
    assert len({s.digest() for s in finals}) == 1
    assert all(r.outcome == "averaged" for r in reports), [r.problem for r in reports]
    steps = sorted(r.steps for r in reports)
    assert steps[-2:] == [4, 4] and 1 <= steps[0] < 4, steps  # the slow one stopped early
    weights = sorted(w for _, _, w in reports[0].contributions)
    assert weights == [float(s) for s in steps]  # each claimed what it trained


def test_an_automatic_deadline_comes_from_the_groups_step_times() -> None:
    """`inner.deadline_s: auto`: the first round has no deadline (every member trains H and
    says how long its steps took); the group then agrees on H x the median step time, a fast
    member's, so in the next round the member that sleeps 1 s per step stops short of H
    while the group still averages to one digest."""
    config = CONFIG.model_copy(
        update={"inner": CONFIG.inner.model_copy(update={"deadline_s": "auto", "steps": 4})}
    )
    hub = InMemoryHub(expected=3)
    locals_ = [build_local_model(config, f"builtin:{t}", data_seed=i) for i, t in enumerate(TASKS)]
    _slowed(locals_[2].trainer, 1.0)
    reports: list[list[RoundReport]] = [[], [], []]
    peers = [
        _peer(hub, f"p{i}", lo, reports=reports[i], config=config) for i, lo in enumerate(locals_)
    ]
    finals = _run_all(peers, [2, 2, 2])
    assert len({s.digest() for s in finals}) == 1
    rounds = list(zip(*reports, strict=True))
    assert all(r.outcome == "averaged" for one in rounds for r in one)
    assert [r.steps for r in rounds[0]] == [4, 4, 4]  # no deadline before the group said
    deadlines = {r.next_deadline_s for r in rounds[0]}
    assert len(deadlines) == 1  # every member derived the same one from the same metadata
    (deadline,) = deadlines
    assert deadline is not None and deadline < 4 * 1.0  # a fast member's H steps, not the slow's
    # each of its steps takes over 1 s: it stops once the deadline passed, short of H (on an
    # idle machine after one step; a loaded one slows the fast members' steps and so the
    # deadline, never the rule)
    assert 1 <= rounds[1][2].steps <= math.ceil(deadline / 1.0) < 4
    assert rounds[1][2].inner_s < rounds[0][2].inner_s


def test_the_agreed_deadline_is_h_times_the_median_of_the_aggregated_members_step_times() -> None:
    """conclude_round gives the next deadline only under `auto`, only for an averaged round,
    and only from the members it aggregated (an excluded member's claim does not count)."""
    from swarmtune.node.engine.round import LocalUpdate, conclude_round
    from swarmtune.node.local.trainer import InnerResult

    steps = CONFIG.inner.steps
    auto = CONFIG.model_copy(
        update={"inner": CONFIG.inner.model_copy(update={"deadline_s": "auto"})}
    )
    times = {"a": 0.2, "b": 0.3, "c": 1.5, "z": 1e4}
    metas = [
        MemberMeta(p, 0, "d", float(steps) if p != "z" else 0.5, step_s=t) for p, t in times.items()
    ]
    deltas = {p: {"w": torch.full((3,), 0.01)} for p in times}
    start = GroupState(0, {"w": torch.zeros(3)}, {})
    mine = LocalUpdate(deltas["a"], metas[0], InnerResult(steps, 1.0, 1.0, 1.0, 1, 0.2))
    _, report = conclude_round(start, mine, GroupResult(metas, deltas), auto)
    assert "z" in report.excluded
    assert report.next_deadline_s == steps * statistics.median_high([0.2, 0.3, 1.5])
    _, fixed = conclude_round(start, mine, GroupResult(metas, deltas), CONFIG)
    assert fixed.next_deadline_s is None
    _, alone = conclude_round(start, mine, AveragingFailed("no group"), auto)
    assert alone.next_deadline_s is None


@pytest.mark.parametrize("weight", ["steps", "tokens"])
def test_combine_rescales_by_steps_before_the_robust_rules(weight: str) -> None:
    """A member that trained a quarter of the steps and sent a quarter of the Delta counts as a
    full member under step weights (the aggregate is exactly d, norm bound and CenteredClip
    included); under token weights it is averaged as it came."""
    d = {"w": torch.tensor([0.5, -1.0, 2.0, 0.25])}
    config = CONFIG.model_copy(
        update={"averaging": CONFIG.averaging.model_copy(update={"weight": weight})}
    )
    got = combine([d, {"w": d["w"] * 0.25}], [4.0, 1.0], config)
    if weight == "steps":
        assert torch.equal(got["w"].to(d["w"].dtype), d["w"])
    else:
        assert not torch.allclose(got["w"].double(), d["w"].double())


@pytest.mark.parametrize("claimed", [1e-300, 0.5, 2.5])
def test_a_weight_that_is_not_a_whole_number_of_steps_is_excluded_and_an_offence(
    claimed: float,
) -> None:
    """Found in review: a claim near 0 was rescaled ~1e300-fold and made every member's
    aggregate NaN. Under step weights a claim must be a whole number from 1 to H."""
    from swarmtune.node.engine.round import LocalUpdate, conclude_round
    from swarmtune.node.local.trainer import InnerResult

    steps = CONFIG.inner.steps
    deltas = {p: {"w": torch.full((3,), 0.01 * (i + 1))} for i, p in enumerate("abcz")}
    metas = [_meta(p, float(steps)) for p in "abc"] + [_meta("z", claimed)]
    group = GroupResult(metas, deltas)
    start = GroupState(0, {"w": torch.zeros(3)}, {})
    mine = LocalUpdate(deltas["a"], metas[0], InnerResult(steps, 1.0, 1.0, 1.0, 1, 0.0))
    state, report = conclude_round(start, mine, group, CONFIG)
    assert report.outcome == "averaged" and set(report.members) == {"a", "b", "c"}
    assert "z" in report.excluded and state.offences == {"z": [0]}
    assert torch.isfinite(state.params["w"]).all()


def test_without_a_deadline_the_trainer_always_takes_h_steps_and_with_one_at_least_one() -> None:
    local = _local("arithmetic", 0)
    assert local.trainer.train_steps(3).steps == 3
    assert local.trainer.train_steps(3, deadline=time.monotonic() - 1).steps == 1
    assert local.trainer.train_steps(3, deadline=time.monotonic() + 3600).steps == 3


GHBM = parse_config(
    {
        "inner": {"steps": 4, "batch_size": 4, "seq_len": 32},
        "outer": {"name": "ghbm", "tau": 2},
    }
)


def test_ghbm_ring_travels_with_the_state_to_a_restarted_peer(tmp_path: Path) -> None:
    hub = InMemoryHub(expected=3, timeout=1.5)
    reports: list[RoundReport] = []

    def peer(i: int, task: str) -> Peer:
        return _peer(hub, f"p{i}", _local(task, i), tmp_path / f"p{i}", reports, GHBM)

    peers = [peer(i, t) for i, t in enumerate(TASKS)]
    _run_all(peers, [2, 2, 2])
    hub.expected = 2
    _run_all(peers[:2], [2, 2])  # p2 is down for two rounds; the ring moves on without it
    reborn = peer(2, "code")
    hub.expected = 3
    reports.clear()
    states = _run_all([peers[0], peers[1], reborn], [1, 1, 1])
    assert reborn.resumed_from == 2 and reborn.resynced_to[0] == 4
    # same start digest (which covers the ring), so all three applied the same correction
    assert all(r.outcome == "averaged" and r.group_size == 3 and r.tau == 2 for r in reports)
    assert len({s.digest() for s in states}) == 1 and states[0].round == 5
    assert len(states[0].outer_state["history"]) == 3  # tau + 1 global states


def test_fedhbm_anchor_is_kept_in_the_local_checkpoint(tmp_path: Path) -> None:
    config = parse_config(
        {"inner": {"steps": 3, "batch_size": 4, "seq_len": 32}, "outer": {"name": "fedhbm"}}
    )
    hub = InMemoryHub(expected=1)
    first = _peer(hub, "p0", _local("dates", 0), tmp_path, config=config)
    first.run(2)
    assert first.momentum is not None and first.momentum.anchor_round == 1
    again = _peer(hub, "p0", _local("dates", 0), tmp_path, config=config)
    again.initial_state()
    assert again.momentum is not None and again.momentum.anchor_round == 1
    for k, v in first.momentum.anchor.items():
        assert torch.equal(v, again.momentum.anchor[k])


def test_group_context_uses_the_largest_population_any_member_knew() -> None:
    members = [MemberMeta("a", 0, "d", 1.0, known=10), MemberMeta("b", 0, "d", 1.0, known=12)]
    context = group_context(members)
    assert (context.participants, context.population) == (2, 12)
    assert group_context(members[:1]).participants == 1


class _MovesOnce:
    """RoundHooks of a peer that joins another group before its first round."""

    def __init__(self) -> None:
        self.calls = 0

    def before_round(self, state: GroupState) -> bool:
        self.calls += 1
        return self.calls == 1


def test_a_mover_adopts_its_destination_state_even_from_a_lower_round() -> None:
    hub = InMemoryHub(expected=2, timeout=1.5)
    residents = [_peer(hub, f"p{i}", _local(t, i)) for i, t in enumerate(TASKS[:2])]
    _run_all(residents, [2, 2])  # the destination group is at round 2
    mover_local = _local("code", 2)
    # the mover comes from a group that is further along (round 5, other parameters)
    ahead = GroupState(5, {k: v + 0.05 for k, v in mover_local.trainer.get_params().items()})
    mover = Peer(mover_local.trainer, InMemoryTransport(hub, "p2"), CONFIG, hooks=_MovesOnce())
    hub.expected = 3
    results: list = [None, None, None]
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, residents[i].run(1, 2.0)))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    state, report = mover.one_round(ahead)
    for t in threads:
        t.join(timeout=120)
    assert mover.resynced_to == [2] and report.resynced and report.outcome == "averaged"
    assert report.members == ("p0", "p1", "p2")
    assert state.round == 3 and state.digest() == results[0].digest() == results[1].digest()


def test_what_others_read_about_a_round_is_never_a_round_behind() -> None:
    # status and the model card read the record that announce_state stores: the report of a
    # round (loss, eval, group size) must be in before that round's state is announced
    hub = InMemoryHub(expected=1)
    events: list[str] = []

    class Recording(InMemoryTransport):
        def announce_state(self, state: GroupState, *proof) -> None:  # noqa: ANN002
            events.append(f"announce {state.round}")
            super().announce_state(state, *proof)

    local = _local("dates", 0)
    peer = Peer(
        local.trainer,
        Recording(hub, "p0"),
        CONFIG,
        on_report=lambda r: events.append(f"report {r.round + 1}"),
    )
    peer.run(2)
    assert events[:5] == ["announce 0", "report 1", "announce 1", "report 2", "announce 2"]


class _HelperDiesOnStop(InMemoryTransport):
    """Like a Ctrl+C that reached hivemind's helper processes first: the stop is set and the
    exchange fails with whatever the dead daemon's socket raised."""

    def __init__(self, hub: InMemoryHub, name: str, stop: threading.Event) -> None:
        super().__init__(hub, name)
        self.stop = stop

    def exchange(self, delta, meta, ahead=0.0):  # noqa: ANN001, ANN201
        self.stop.set()
        raise FileNotFoundError(2, "No such file or directory")


def test_a_failure_while_stopping_abandons_the_round_and_a_failure_otherwise_raises(
    tmp_path: Path,
) -> None:
    local = _local("arithmetic", 0)
    stop = threading.Event()
    hub = InMemoryHub(expected=1, timeout=1.0)
    peer = Peer(
        local.trainer, _HelperDiesOnStop(hub, "p0", stop), CONFIG, Checkpoint(tmp_path), stop=stop
    )
    state = peer.run(5)
    assert state.round == 0  # abandoned at once, nothing half-applied
    torch.testing.assert_close(local.trainer.get_params(), state.params, rtol=0, atol=0)

    class _Broken(InMemoryTransport):
        def exchange(self, delta, meta, ahead=0.0):  # noqa: ANN001, ANN201
            raise FileNotFoundError(2, "No such file or directory")

    broken = Peer(_local("arithmetic", 0).trainer, _Broken(hub, "p1"), CONFIG, None)
    with pytest.raises(FileNotFoundError):
        broken.run(1)


def test_eval_every_n_rounds_evaluates_only_those_rounds() -> None:
    hub = InMemoryHub(expected=2, timeout=5.0)
    reports: list[RoundReport] = []
    calls: list[int] = []
    locals_ = [_local(t, i) for i, t in enumerate(TASKS[:2])]
    peers = [
        Peer(
            lo.trainer,
            InMemoryTransport(hub, f"p{i}"),
            CONFIG,
            on_report=reports.append if i == 0 else None,
            evaluate=(lambda: calls.append(1) or {"eval_loss": 1.0}) if i == 0 else None,
            eval_every=2,
        )
        for i, lo in enumerate(locals_)
    ]
    _run_all(peers, [3, 3])
    # rounds reach states 1, 2, 3: only state 2 is due
    assert [r.eval_loss for r in reports] == [None, 1.0, None] and len(calls) == 1
    with pytest.raises(ValueError, match="eval_every"):
        Peer(locals_[0].trainer, InMemoryTransport(hub, "p9"), CONFIG, eval_every=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_wait_for_holds_the_first_round_until_enough_volunteers_announced(overlap: bool) -> None:
    hub = InMemoryHub(expected=2, timeout=5.0)
    reports: list[RoundReport] = []
    locals_ = [_local(t, i) for i, t in enumerate(TASKS[:2])]
    trained = threading.Event()
    train_steps = locals_[0].trainer.train_steps

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        trained.set()
        return train_steps(*args, **kwargs)

    locals_[0].trainer.train_steps = spy  # type: ignore[method-assign]

    def peer(i: int) -> Peer:
        sink = reports.append if i == 0 else None
        transport = InMemoryTransport(hub, f"p{i}")
        return Peer(
            locals_[i].trainer, transport, CONFIG, on_report=sink, overlap=overlap, wait_for=2
        )

    first = peer(0)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(first.run(1, settle_s=2.0)))
    thread.start()
    # alone, it announced its start but does not begin its first inner phase
    assert not trained.wait(timeout=1.5)
    assert thread.is_alive() and not hub._pending and not reports
    assert set(hub.states) == {"p0"}
    second = peer(1).run(1, settle_s=2.0)
    thread.join(timeout=30)
    assert trained.is_set() and not thread.is_alive()
    assert [r.outcome for r in reports] == ["averaged"] and reports[0].group_size == 2
    assert results[0].digest() == second.digest()


def test_wait_for_does_not_hold_a_run_that_is_under_way_or_a_resume(tmp_path: Path) -> None:
    hub = InMemoryHub(expected=2, timeout=1.5)
    # two volunteers are past round 0 already: the run started without us
    _run_all([_peer(hub, f"e{i}", _local(t, i)) for i, t in enumerate(TASKS[:2])], [3, 3])
    local = _local("arithmetic", 0)

    def started(peer: Peer) -> GroupState:  # fails in seconds, not at the suite's timeout
        out: list[GroupState] = []
        thread = threading.Thread(target=lambda: out.append(peer.start()), daemon=True)
        thread.start()
        thread.join(timeout=10)
        peer.stop.set()  # (ends a wait that should not have happened)
        assert out, "start() waited for volunteers"
        return out[0]

    late = Peer(local.trainer, InMemoryTransport(hub, "p0"), CONFIG, wait_for=5)
    assert started(late).round == 3  # synced to it, no wait
    hub.states.clear()
    hub.claims.clear()
    Checkpoint(tmp_path).save(
        GroupState(2, local.trainer.get_params(), {}), local.trainer.state_dict()
    )
    resumed = Peer(
        local.trainer, InMemoryTransport(hub, "p1"), CONFIG, Checkpoint(tmp_path), wait_for=5
    )
    assert started(resumed).round == 2 and resumed.resumed_from == 2


@pytest.mark.parametrize("aggregator", ["centered-clip", "mean"])
def test_zero_updates_are_dropped_before_a_robust_rule_and_counted_by_the_plain_mean(
    aggregator: str,
) -> None:
    plain = {"aggregator": "mean", "norm_bound": None}  # no defence at all
    config = parse_config(
        {"averaging": {"aggregator": "centered-clip"} if aggregator != "mean" else plain}
    )
    gen = torch.Generator().manual_seed(0)
    honest = [{"w": torch.randn(6, 4, generator=gen)} for _ in range(3)]
    zeros = [{"w": torch.zeros(6, 4)}] * 3
    alone = combine(honest, [1.0] * 3, config)
    with_zeros = combine([*honest, *zeros], [1.0] * 6, config)
    if aggregator == "centered-clip":  # default: half the weight sending zeros changes nothing
        assert torch.equal(with_zeros["w"], alone["w"])
    else:  # the undefended mean, kept as the baseline: zeros halve it
        eps = torch.finfo(torch.float32).eps
        atol = 4 * eps * float(alone["w"].abs().max())
        torch.testing.assert_close(with_zeros["w"], alone["w"] / 2, rtol=0, atol=atol)


def test_a_group_below_min_group_size_applies_no_update_and_its_members_still_agree() -> None:
    config = CONFIG.model_copy(
        update={"averaging": CONFIG.averaging.model_copy(update={"min_group_size": 3})}
    )
    hub = InMemoryHub(expected=2)
    locals_ = [_local(task, i) for i, task in enumerate(TASKS[:2])]
    start = locals_[0].trainer.get_params()
    reports: list[RoundReport] = []
    peers = [
        _peer(hub, f"p{i}", local, reports=reports, config=config)
        for i, local in enumerate(locals_)
    ]
    states = _run_all(peers, [2, 2])
    # a pair has no majority: neither member's update moved the group, and both still ended
    # on one state that both vouch for (so neither goes back, resyncs or trains alone)
    assert len({s.digest() for s in states}) == 1 and states[0].round == 2
    assert all(r.outcome == "too-small" and not r.verified and r.concluded for r in reports)
    assert all(r.contributions == () and len(r.members) == 2 for r in reports)
    assert all(torch.equal(states[0].params[k], start[k]) for k in start)  # fedavg: no step
    assert all(p.counts.rejections == 2 and p.counts.resyncs == 0 for p in peers)
    assert all(p.ledger.claim is not None for p in peers)


def test_a_nan_loss_stops_the_peer_with_one_line_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    from swarmtune.node.errors import USER_ERRORS
    from swarmtune.node.local.errors import TrainingDiverged

    hub = InMemoryHub(expected=1)
    local = _local("dates", 0)
    peer = _peer(hub, "p0", local, tmp_path)
    saved = peer.run(1, settle_s=0.0)
    with torch.no_grad():  # a base weight gone bad (not in the state): every loss is NaN
        next(
            p for n, p in local.model.named_parameters() if "lora_" not in n and p.dim() == 1
        ).fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as caught:
        peer.run(2, settle_s=0.0)
    message = str(caught.value)
    assert "inner step 1 of 4" in message and "nan" in message and "\n" not in message
    assert isinstance(caught.value, USER_ERRORS)  # the CLI prints it as one line, exit 2
    # no optimizer step ran on the NaN gradients, and the checkpoint is the last good round
    after = local.trainer.get_params()
    assert all(torch.equal(after[n], t) for n, t in saved.params.items())
    shapes = {n: t.shape for n, t in saved.params.items()}
    loaded = Checkpoint(tmp_path).load(shapes)
    assert loaded is not None and loaded[0].digest() == saved.digest() and saved.round == 1
    with pytest.raises(TrainingDiverged, match="held-out loss"):
        local.eval_loss()


class _ColdStartThenSlowVotes(InMemoryTransport):
    """Its first exchange finds no group (as hivemind's first matchmaking can); its announcements
    that carry a vote arrive `delay` seconds late."""

    def __init__(self, hub: InMemoryHub, name: str, delay: float) -> None:
        super().__init__(hub, name)
        self.tries, self.delay = 0, delay

    def exchange(self, delta, meta, ahead=0.0):  # noqa: ANN001, ANN201
        self.tries += 1
        if self.tries == 1:
            raise AveragingFailed("could not find a group (injected)")
        return super().exchange(delta, meta, ahead)

    def announce_state(self, state, claim=None, chain=None) -> None:  # noqa: ANN001
        if claim is not None:
            time.sleep(self.delay)
        super().announce_state(state, claim, chain)


def test_a_round_retried_after_training_alone_is_certified_with_every_members_vote() -> None:
    # both members train round 1 alone, go back to round 0 and average round 1 together; p1's
    # vote for it arrives while its record still shows its lone round 1. Taking that record
    # for its announcement left p0's round-1 link one vote short for good, and a late joiner
    # refused every state whose chain went through it (seen on real peers: the GHBM test's late
    # joiner stuck at round 0)
    hub = InMemoryHub(expected=2, timeout=5.0)
    peers = [
        Peer(_local(task, i).trainer, _ColdStartThenSlowVotes(hub, f"p{i}", 0.6 * i), CONFIG)
        for i, task in enumerate(TASKS[:2])
    ]
    states = _run_all(peers, [3, 3])
    assert [p.resynced_to for p in peers] == [[0], [0]]  # each went back once
    assert {s.round for s in states} == {2} and len({s.digest() for s in states}) == 1
    for peer, (_, chain) in hub.served().items():  # the newest link's votes are the live ones
        assert [len(c.valid_votes()) for c in chain[:-1]] == [2], peer
    late = Peer(_local(TASKS[2], 2).trainer, InMemoryTransport(hub, "p2"), CONFIG)
    assert late.sync(late.initial_state()).digest() == states[0].digest()
    assert late.counts.unproven == 0
