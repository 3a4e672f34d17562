"""What honest peers adopt (docs/design.md, 8. Trust, "States carry proof"): hostile states
announced on the in-memory transport, through the same Peer.sync the daemon runs.

Each attack here took every honest peer's state before round certificates (the highest
announced round won); each test fails on that code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmtune.aggregation.outer import RoundContext
from swarmtune.node.config import RunConfig, parse_config
from swarmtune.node.engine.certify import Claim, round_body
from swarmtune.node.engine.checkpoint import Checkpoint
from swarmtune.node.engine.outer_state import (
    HEADER_ROOM,
    OFFENCE_ROOM,
    check_outer,
    load_outer,
    state_cap,
)
from swarmtune.node.engine.peer import Peer
from swarmtune.node.engine.round import outer_phase
from swarmtune.node.engine.state import GroupState, StateError, encode_state
from swarmtune.node.engine.transport import InMemoryHub, InMemoryTransport
from swarmtune.protocols.certificates import Certificate, sign_body
from swarmtune.protocols.identity import Identity
from tests.node.engine.test_round import CONFIG, TASKS, _local, _peer, _run_all

NESTEROV = CONFIG.model_copy(
    update={"outer": CONFIG.outer.model_copy(update={"name": "nesterov", "lr": 0.7})}
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Swarm:
    """Three honest peers that concluded two rounds together, and a place to forge."""

    def __init__(self, tmp: Path | None = None) -> None:
        self.hub = InMemoryHub(expected=3, timeout=2.0)
        self.peers = [
            _peer(self.hub, f"p{i}", _local(t, i), tmp / f"p{i}" if tmp else None)
            for i, t in enumerate(TASKS)
        ]
        self.states = _run_all(self.peers, [2, 2, 2])
        assert len({s.digest() for s in self.states}) == 1 and self.states[0].round == 2

    def forge(
        self, name: str, state: GroupState, voters: list[str], identities: dict[str, Identity]
    ) -> None:
        """Announce `state` as `name`, with a link from the honest state and votes from
        `voters` (each signing with its own identity)."""
        honest = self.states[0]
        members = [(v, "ab" * 32, 100.0) for v in voters]
        body = round_body(CONFIG.run_id, honest.digest(), state, members)
        votes = [sign_body(identities[v], body, v) for v in voters]
        chain = [*self.peers[0].ledger.chain, Certificate(body, tuple(votes))]
        for voter, vote in zip(voters, votes, strict=True):
            self.hub.keys[voter] = vote.key
            self.hub.states[voter] = state
            self.hub.chains[voter] = chain
            self.hub.claims[voter] = Claim(state.round, state.digest(), body.sha256(), vote)


def _negated(state: GroupState, round_: int) -> GroupState:
    params = {k: -3 * v if "lora_B" in k else v.clone() for k, v in state.params.items()}
    return GroupState(round_, params, dict(state.outer_state), dict(state.offences))


@pytest.mark.parametrize("ahead", [1, 3, 1_000])
def test_a_forged_state_announced_ahead_is_never_adopted(ahead: int) -> None:
    swarm = Swarm()
    forged = _negated(swarm.states[0], swarm.states[0].round + ahead)
    swarm.forge("x", forged, ["x"], {"x": Identity.generate()})
    for peer, state in zip(swarm.peers, swarm.states, strict=True):
        assert peer.sync(state) is state
        assert peer.resynced_to == [] and peer.counts.unproven == 0  # never even fetched


def test_votes_from_unadmitted_or_banned_peers_do_not_count() -> None:
    swarm = Swarm()
    ids = {v: Identity.generate() for v in ("x", "y")}
    forged = _negated(swarm.states[0], 3)
    swarm.forge("x", forged, ["x", "y"], ids)  # 2 of 5 announcers: outside the threat model

    class Gated(InMemoryTransport):
        def may_vote(self, vote):  # noqa: ANN001, ANN201 - the transport's admission check
            return vote.peer not in ("x", "y") and super().may_vote(vote)

    local = swarm.peers[0]
    gated = Peer(local.trainer, Gated(swarm.hub, "p0"), CONFIG, identity=local.ledger.identity)
    gated.ledger = local.ledger
    assert gated.sync(swarm.states[0]).digest() == swarm.states[0].digest()
    local.banned = {"x": "banned"}  # what our group's offence record keeps out
    assert local.sync(swarm.states[0]) is swarm.states[0] and local.resynced_to == []
    # and with neither in place, two colluders (40% of the announcers) would have won
    assert local.banned.pop("x") and local.sync(swarm.states[0]).round == 3


def test_a_quorum_backed_state_without_a_chain_to_a_held_state_is_refused() -> None:
    swarm = Swarm()
    ids = {v: Identity.generate() for v in ("x", "y")}
    forged = _negated(swarm.states[0], 3)
    swarm.forge("x", forged, ["x", "y"], ids)
    for voter in ("x", "y"):
        swarm.hub.chains[voter] = swarm.hub.chains[voter][-1:]  # the link from round 2 only
    peer = swarm.peers[0]
    peer.ledger.trusted = {"00" * 32}  # holds nothing the chain reaches
    assert peer.sync(swarm.states[0]) is swarm.states[0]
    assert peer.counts.unproven == 1 and peer.resynced_to == []


PARAM = "base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"


@pytest.mark.parametrize(
    "outer",
    [
        {"lr": 1.0, "buffer": {PARAM: torch.zeros(3)}},  # not this model's shapes
        {"lr": 1.0, "buffer": "not tensors"},
        {"lr": 1.0, "buffer": {PARAM: torch.full((8, 344), float("nan"))}},
    ],
)
def test_a_broken_outer_state_is_refused_and_never_crashes_a_restart(
    outer: dict, tmp_path: Path
) -> None:
    swarm = Swarm(tmp_path)
    peer = swarm.peers[0]
    broken = GroupState(3, swarm.states[0].params, outer)
    ids = {v: Identity.generate() for v in ("x", "y")}
    swarm.forge("x", broken, ["x", "y"], ids)
    config = peer.config
    peer.config = NESTEROV
    assert peer.sync(swarm.states[0]) is swarm.states[0] and peer.counts.unproven == 1
    peer.config = config
    # a checkpoint holding it (written by an older version) is set aside, not a crash loop
    Checkpoint(tmp_path / "p0").save(broken, {})
    again = _peer(swarm.hub, "p0", _local(TASKS[0], 0), tmp_path / "p0", config=NESTEROV)
    assert again.initial_state().round == 0
    assert list((tmp_path / "p0").glob("state.corrupt-*"))


def test_hyperparameters_come_from_the_config_not_from_a_state() -> None:
    params = {"w": torch.ones(4)}
    ascent = GroupState(1, params, {"lr": -0.7, "momentum": 0.9, "buffer": {}})
    outer = load_outer(ascent, NESTEROV)
    assert outer.lr == pytest.approx(0.7)  # type: ignore[attr-defined]
    new, _ = outer_phase(ascent, {"w": torch.ones(4)}, RoundContext(2, 2), NESTEROV)
    assert bool((new.params["w"] < 1).all())  # descent on a positive pseudo-gradient
    with pytest.raises(StateError):
        check_outer(GroupState(1, params, {"lr": 1.0, "buffer": {"w": torch.ones(3)}}), NESTEROV)


def test_a_peer_that_trained_alone_goes_back_to_the_state_its_group_shares() -> None:
    swarm = Swarm()
    peer, other = swarm.peers[0], swarm.peers[1]
    swarm.hub.expected = 1  # p0 trains a round alone (no group forms)
    solo, report = peer.one_round(swarm.states[0])
    assert report.outcome == "no-group" and solo.round == 3
    # others are around and nobody can vouch for round 3: back to the shared round-2 state
    back = peer.sync(solo)
    assert back.digest() == swarm.states[1].digest() and peer.resynced_to == [2]
    assert other.sync(swarm.states[1]) is swarm.states[1]  # the solo state never wins


def test_a_level_state_only_its_author_vouches_for_does_not_replace_the_groups() -> None:
    swarm = Swarm()
    level = _negated(swarm.states[0], 2)
    swarm.forge("x", level, ["x"], {"x": Identity.generate()})
    assert swarm.peers[1].sync(swarm.states[1]) is swarm.states[1]


GHBM = parse_config({"outer": {"name": "ghbm"}})


def _stepped(config: RunConfig, steps: int) -> GroupState:
    """A state whose outer optimizer took `steps` honest steps (what the run itself writes)."""
    params = {"w": torch.ones(4, 3), "v": torch.ones(5)}
    state = GroupState(0, params)
    for _ in range(steps):
        state, _ = outer_phase(
            state, {k: 0.1 * v for k, v in params.items()}, RoundContext(2, 2), config
        )
    return state


@pytest.mark.parametrize("config", [NESTEROV, GHBM, parse_config({"outer": {"name": "fedadam"}})])
def test_an_honest_outer_state_passes_and_every_kind_of_tampering_is_refused(
    config: RunConfig,
) -> None:
    state = _stepped(config, 3)
    check_outer(state, config)  # what the optimizer writes passes
    tensors = [k for k, v in state.outer_state.items() if isinstance(v, dict) and v]
    ring_or_buffer = tensors[0]
    first = next(iter(state.outer_state[ring_or_buffer].values()))

    def broken(**changes: object) -> GroupState:
        return GroupState(state.round, state.params, {**state.outer_state, **changes}, {})

    tampered = [
        broken(junk=1.0),  # a field the optimizer does not write
        broken(**{ring_or_buffer: {**state.outer_state[ring_or_buffer], "extra": first}}),
    ]
    if config is GHBM:  # scalars: NaN (JSON parses it), a string, a ring past tau_max + 1
        ring = state.outer_state["history"]
        long = {str(i): ring["0"] for i in range(config.outer.tau_max + 2)}
        tampered += [broken(participation=float("nan")), broken(participation="0.5")]
        tampered += [broken(history=long)]
        tampered += [broken(history={**ring, "0": {"w": torch.ones(1), "v": torch.ones(5)}})]
    else:  # a buffer that broadcasts: one number where the adapter has a (4, 3) matrix
        buffer = dict(state.outer_state[ring_or_buffer])
        buffer["w"] = torch.ones(1)
        tampered += [broken(**{ring_or_buffer: buffer})]
    for bad in tampered:
        with pytest.raises(StateError):
            check_outer(bad, config)


@pytest.mark.parametrize("config", [NESTEROV, GHBM])
def test_the_state_cap_holds_the_largest_honest_state_and_little_more(config: RunConfig) -> None:
    state = _stepped(config, 2 * config.outer.tau_max + 4 if config is GHBM else 5)
    shapes = {k: v.shape for k, v in state.params.items()}
    cap = state_cap(shapes, config)
    honest = len(encode_state(state))
    assert honest <= cap
    assert cap <= honest + OFFENCE_ROOM + HEADER_ROOM  # nothing else fits in the room left


def test_a_state_blob_over_the_cap_is_not_taken() -> None:
    swarm = Swarm()
    ids = {v: Identity.generate() for v in ("x", "y")}
    forged = _negated(swarm.states[0], 3)
    swarm.forge("x", forged, ["x", "y"], ids)  # quorum-backed: only the cap stands in the way
    peer = swarm.peers[0]
    peer.state_cap = len(encode_state(forged)) - 1
    assert peer.sync(swarm.states[0]) is swarm.states[0] and peer.resynced_to == []
    peer.state_cap = len(encode_state(forged))  # at the cap it is fetched (and then adopted)
    assert peer.sync(swarm.states[0]).round == 3
