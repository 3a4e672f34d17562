"""Admission tickets and the refused set shared with the averager process."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from protocols.admission import (
    CLOCK_SKEW_S,
    Gate,
    TicketError,
    issue_ticket,
    public_key_of,
    read_ticket,
)
from protocols.matchmaking import RefusedSet

KEY = RSAPrivateKey()
COORDINATOR = RSASignatureValidator(KEY).local_public_key.decode()
PEER = "QmVolunteerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
NOW = 1_800_000_000.0


def test_a_ticket_admits_its_peer_in_its_run_until_it_expires() -> None:
    ticket = issue_ticket(KEY, "run-a", PEER, 3600, now=NOW)
    gate = Gate(COORDINATOR, "run-a")
    assert gate.check(PEER, ticket, now=NOW) is None
    assert gate.check(PEER, ticket, now=NOW + 3599) is None
    assert "expired" in (gate.check(PEER, ticket, now=NOW + 3600) or "")
    assert read_ticket(ticket).peer == PEER and len(ticket) < 1024


@pytest.mark.parametrize(
    "peer, run, now, why",
    [
        ("QmSomeoneElse", "run-a", NOW, "belongs to peer"),
        (PEER, "run-b", NOW, "for run 'run-a'"),
        (PEER, "run-a", NOW - CLOCK_SKEW_S - 10, "in the future"),
    ],
)
def test_a_ticket_does_not_transfer(peer: str, run: str, now: float, why: str) -> None:
    ticket = issue_ticket(KEY, "run-a", PEER, 3600, now=NOW)
    assert why in (Gate(COORDINATOR, run).check(peer, ticket, now=now) or "")


def test_only_the_runs_coordinator_can_issue_tickets() -> None:
    forged = issue_ticket(RSAPrivateKey(), "run-a", PEER, 3600, now=NOW)
    assert "not signed" in (Gate(COORDINATOR, "run-a").check(PEER, forged, now=NOW) or "")
    # a genuine ticket whose claims were edited (a longer expiry) no longer verifies
    head, payload, signature = issue_ticket(KEY, "run-a", PEER, 60, now=NOW).split(".")
    other = issue_ticket(KEY, "run-a", PEER, 10**6, now=NOW).split(".")[1]
    edited = f"{head}.{other}.{signature}"
    assert "not signed" in (Gate(COORDINATOR, "run-a").check(PEER, edited, now=NOW) or "")
    assert payload != other


@pytest.mark.parametrize("ticket", ["", None, 42, "st1.x", "st2.a.b", "st1.!!!.###", "x" * 5000])
def test_garbage_tickets_are_refused_in_one_line(ticket: object) -> None:
    why = Gate(COORDINATOR, "run-a").check(PEER, ticket, now=NOW)
    assert why is not None and "\n" not in why


def test_a_manifest_without_a_coordinator_key_has_no_gate() -> None:
    with pytest.raises(TicketError):
        public_key_of("")
    with pytest.raises(TicketError):
        public_key_of("[owner:not a key]")


def _read_in_child(refused: RefusedSet, go: mp.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(sorted(refused.current()))
    go.wait(10)
    out.put(sorted(refused.current()))


def test_the_refused_set_reaches_a_forked_process_after_it_started() -> None:
    refused = RefusedSet(capacity=200)
    refused.update({"QmA", "QmB"})
    assert refused.current() == {"QmA", "QmB"}
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = ctx.Event()
    child = ctx.Process(target=_read_in_child, args=(refused, go, out))
    child.start()
    assert out.get(timeout=10) == ["QmA", "QmB"]
    refused.update({"QmC"})  # after the fork: the child must see the new set
    go.set()
    assert out.get(timeout=10) == ["QmC"]
    child.join(10)
    # more ids than fit: whole ids only, never a truncated one
    many = {f"Qm{i:040d}" for i in range(10)}
    refused.update(many)
    assert refused.current() and refused.current() <= many
