"""Tickets on request, priced by address (`admission.policy: address`; docs/design.md, 8. Trust,
"Identities"): a volunteer asks the coordinator over its authenticated stream; the coordinator
sees which IPv4 address the connection comes from and grants a ticket (protocols/admission.py)
only while that address holds fewer than the run's limit of identities. One person then needs
one address per identity instead of one key file per identity.

The coordinator decides (a `grant` callable it passes in); this module only carries the
request and the answer, and reads the address from libp2p's own connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from swarmtune.protocols.reach import observed_ip
from swarmtune.protocols.transfer import TransferError, read_frame, write_frame

log = logging.getLogger("swarmtune.admission")
TICKET_PROTOCOL = "swarmtune.ticket.v1"
REQUEST_TIMEOUT = 10.0
MAX_FRAME = 4096
# (peer id, observed IPv4 address) -> (ticket, "") when granted, ("", why not) otherwise
Grant = Callable[[str, str], tuple[str, str]]


class TicketDeskError(RuntimeError):
    """No ticket came back; one line saying why."""


class DeskUnanswered(TicketDeskError):
    """The request got no answer (the stream failed or timed out), as opposed to a refusal:
    worth asking again (a coordinator busy with many joins at once)."""


class TicketDesk:
    """The coordinator's side: answers ticket requests with `grant(peer, address)`."""

    def __init__(self, p2p: P2P, grant: Grant) -> None:
        self._p2p, self._grant = p2p, grant

    async def start(self) -> None:
        await self._p2p.add_binary_stream_handler(TICKET_PROTOCOL, self._handle)

    async def _handle(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await asyncio.wait_for(read_frame(reader, MAX_FRAME, "ticket request"), REQUEST_TIMEOUT)
            peers = await self._p2p.list_peers()
            addrs: list[Any] = next((list(p.addrs) for p in peers if p.peer_id == info.peer_id), [])
            address = observed_ip(addrs)
            if address is None:
                answer = {"ticket": "", "error": "no direct connection from you to price"}
            else:
                ticket, error = self._grant(info.peer_id.to_base58(), address)
                answer = {"ticket": ticket, "error": error}
            await write_frame(writer, json.dumps(answer).encode())
        except Exception as exc:  # noqa: BLE001 - a misbehaving peer never takes the handler down
            log.debug("ticket request from %s failed: %r", info.peer_id, exc)
        finally:
            writer.close()


async def ask_ticket(p2p: P2P, coordinator: PeerID) -> str:
    """A ticket from the coordinator's desk; TicketDeskError with its reason when refused."""
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(coordinator, TICKET_PROTOCOL)
    except (P2PDaemonError, OSError) as exc:
        raise TicketDeskError(f"the coordinator hands out no tickets: {str(exc)[:120]}") from None
    try:
        await write_frame(writer, b"{}")
        raw = await asyncio.wait_for(read_frame(reader, MAX_FRAME, "ticket"), REQUEST_TIMEOUT)
        answer = json.loads(raw)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
        raise DeskUnanswered(f"no ticket from the coordinator ({type(exc).__name__})") from None
    except TransferError as exc:
        raise TicketDeskError(f"no ticket from the coordinator ({exc})") from None
    finally:
        writer.close()
    ticket = answer.get("ticket") if isinstance(answer, dict) else None
    if not isinstance(ticket, str) or not ticket:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise TicketDeskError(str(error or "the coordinator refused")[:200])
    return ticket
