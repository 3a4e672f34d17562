"""Asking the coordinator's ticket desk: an unanswered request is asked again, a refusal is not."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

import swarmtune.protocols.swarm as swarm
from swarmtune.protocols.swarm import SwarmError, SwarmNode
from swarmtune.protocols.ticket_desk import DeskUnanswered, TicketDeskError

COORDINATOR = "QmSeKCJV6ekZW3sNHy6tnxMxpvVk1yEMT7CYpPqzuLpgKK"


def _node() -> Any:
    return SimpleNamespace(p2p=None, loop=SimpleNamespace(run=lambda c, timeout: asyncio.run(c)))


def _desk(answers: list[BaseException | str], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    asked: list[int] = []

    async def ask(p2p: object, coordinator: object) -> str:
        asked.append(1)
        answer = answers[len(asked) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(swarm, "ask_ticket", ask)
    monkeypatch.setattr(swarm, "TICKET_RETRY_S", 0.0)
    return asked


def test_a_request_that_got_no_answer_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # measured: 12 volunteers joining at once on 2 cores, one request's stream failed
    failed = DeskUnanswered("no ticket from the coordinator (IncompleteReadError)")
    asked = _desk([failed, failed, "TICKET"], monkeypatch)
    assert SwarmNode.ask_ticket(_node(), COORDINATOR) == "TICKET"
    assert len(asked) == 3


def test_unanswered_every_time_is_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = DeskUnanswered("no ticket from the coordinator (TimeoutError)")
    asked = _desk([failed] * 3, monkeypatch)
    with pytest.raises(SwarmError, match="no admission ticket: no ticket from the coordinator"):
        SwarmNode.ask_ticket(_node(), COORDINATOR)
    assert len(asked) == 3


def test_a_refusal_is_final(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = TicketDeskError("address 10.0.0.1 already holds 1 identities in this run")
    asked = _desk([refused, "TICKET"], monkeypatch)
    with pytest.raises(SwarmError, match="already holds 1 identities"):
        SwarmNode.ask_ticket(_node(), COORDINATOR)
    assert len(asked) == 1
