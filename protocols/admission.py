"""Admission tickets (docs/design.md, 8. Trust): the coordinator's signed, expiring permission
for one peer id to average in one run, and the gate that checks them.

A ticket is `st1.<payload>.<signature>`, both parts base64url: the payload is canonical JSON
{"expires", "issued", "peer", "run"} (unix seconds), the signature is the coordinator's RSA
signature (its records key, whose public half is the manifest's `coordinator_key`) over the
payload bytes. A ticket admits exactly the peer whose libp2p identity it names: copying someone
else's ticket is useless, because contributions are fetched from, and join requests come from,
authenticated peer ids. Revocation is a coordinator-owned DHT record the members reread every
round (protocols/records.py, RevocationRecord).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarmtune.protocols.group import TICKET_MAX

PREFIX = "st1"
CLOCK_SKEW_S = 300.0  # a ticket issued "in the future" by this much is still accepted
_OWNER = ("[owner:", "]")


class TicketError(ValueError):
    """A ticket that cannot be read or was not issued by this run's coordinator; one line."""


@dataclass(frozen=True)
class Ticket:
    """What a ticket grants: `peer` may average in `run` until `expires` (unix seconds)."""

    run: str
    peer: str
    issued: float
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_ticket(
    key: RSAPrivateKey, run: str, peer: str, ttl_s: float, now: float | None = None
) -> str:
    """A ticket for `peer` in `run`, valid for `ttl_s` seconds from `now`."""
    if ttl_s <= 0:
        raise TicketError(f"a ticket must be valid for a positive time, got {ttl_s:g} s")
    issued = time.time() if now is None else now
    payload = json.dumps(
        {"expires": round(issued + ttl_s, 3), "issued": round(issued, 3), "peer": peer, "run": run},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return f"{PREFIX}.{_b64(payload)}.{_b64(base64.b64decode(key.sign(payload)))}"  # raw RSA bytes


def _split(text: str) -> tuple[bytes, bytes]:
    if len(text) > TICKET_MAX:
        raise TicketError(f"ticket longer than {TICKET_MAX} characters")
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TicketError("not a swarmtune ticket (expected st1.<payload>.<signature>)")
    try:
        return _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise TicketError("ticket is not valid base64") from None


def read_ticket(text: str) -> Ticket:
    """The ticket's claims, unverified (for messages; `Gate.check` verifies)."""
    payload, _ = _split(text)
    try:
        raw = json.loads(payload)
        ticket = Ticket(
            str(raw["run"]), str(raw["peer"]), float(raw["issued"]), float(raw["expires"])
        )
    except (ValueError, KeyError, TypeError):
        raise TicketError("ticket payload is malformed") from None
    return ticket


def public_key_of(coordinator_key: str) -> RSAPublicKey:
    """The coordinator's public key from the manifest's `coordinator_key` ([owner:<key>])."""
    head, tail = _OWNER
    if not (coordinator_key.startswith(head) and coordinator_key.endswith(tail)):
        raise TicketError("the manifest names no coordinator key")
    try:
        return RSAPublicKey.from_bytes(coordinator_key[len(head) : -len(tail)].encode("ascii"))
    except Exception:  # noqa: BLE001 - any parse failure means the same unusable key
        raise TicketError("the manifest's coordinator key is not an RSA public key") from None


class Gate:
    """Checks tickets against one run's coordinator key and its clock (revoked and banned peers
    are refused before, by protocols.matchmaking.RefusedSet)."""

    def __init__(self, coordinator_key: str, run: str) -> None:
        self.key = public_key_of(coordinator_key)
        self.run = run

    def check(self, peer: str, ticket: Any, now: float | None = None) -> str | None:
        """None when `ticket` admits `peer` now; otherwise why not (one line)."""
        if not isinstance(ticket, str) or not ticket:
            return "no admission ticket"
        try:
            payload, signature = _split(ticket)
            claims = read_ticket(ticket)
        except TicketError as exc:
            return str(exc)
        if not self.key.verify(payload, base64.b64encode(signature)):
            return "ticket not signed by this run's coordinator"
        if claims.run != self.run:
            return f"ticket is for run {claims.run!r}"
        if claims.peer != peer:
            return f"ticket belongs to peer …{claims.peer[-8:]}"
        now = time.time() if now is None else now
        if claims.issued > now + CLOCK_SKEW_S:
            return "ticket issued in the future (check the clocks)"
        if claims.expires <= now:
            return f"ticket expired {now - claims.expires:.0f} s ago"
        return None
