"""What a group exchange gives the round: each member's metadata and contributions.

The engine's view of a formed group (node/engine/round.py reads it) and what the hivemind
exchange (protocols/averaging.py) fills in; the in-memory transport fills in the same type.
This module imports no hivemind, so neither does the engine nor the simulator
(tests/test_layering.py checks what importing them loads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from swarmtune.aggregation.params import Params

TICKET_MAX = 2048  # characters of an admission ticket (protocols/admission.py)
STEP_S_MAX = 86_400.0  # seconds: a longer claimed inner step is not believed


@dataclass(frozen=True)
class MemberMeta:
    """What each member tells its group (all-gathered): who, which round and start state, its
    weight, the sha256 and size of its contribution blob, and how many peers it knows of."""

    peer: str
    round: int
    start_digest: str
    weight: float
    sha256: str = ""
    size: int = 0
    known: int = 1  # volunteers this member knows of (for GHBM tau = auto)
    ticket: str = ""  # admission ticket (token runs), protocols/admission.py
    step_s: float = 0.0  # its seconds per inner step this round (0: not said), for a deadline

    def gather(self) -> dict[str, Any]:
        """The wire form sent through hivemind's all-gather."""
        return {
            "round": self.round,
            "start": self.start_digest,
            "weight": self.weight,
            "sha256": self.sha256,
            "size": self.size,
            "known": self.known,
            "ticket": self.ticket,
            "step_s": self.step_s,
        }


def parse_member(peer_id: str, raw: Any) -> MemberMeta | None:
    """MemberMeta from untrusted gathered data, or None when malformed."""
    if not isinstance(raw, dict):
        return None
    start, sha, size, known = raw.get("start"), raw.get("sha256"), raw.get("size"), raw.get("known")
    if not (
        isinstance(start, str) and len(start) <= 64 and isinstance(sha, str) and len(sha) == 64
    ):
        return None
    if not all(finite_number(raw.get(k)) for k in ("round", "weight")) or raw["weight"] < 0:
        return None
    if not (isinstance(size, int) and 0 < size <= 1 << 34):
        return None
    if not (isinstance(known, int) and 1 <= known <= 1_000_000):
        known = 1
    ticket = raw.get("ticket", "")
    if not (isinstance(ticket, str) and len(ticket) <= TICKET_MAX):
        return None
    weight = float(raw["weight"])
    step_s = parse_step_s(raw.get("step_s"))
    return MemberMeta(peer_id, int(raw["round"]), start, weight, sha, size, known, ticket, step_s)


def parse_step_s(value: Any) -> float:
    """A member's claimed seconds per inner step, or 0.0 (not counted) when it said it badly or
    not at all (a member of an older version)."""
    if finite_number(value) and 0 <= value <= STEP_S_MAX:
        return float(value)
    return 0.0


@dataclass
class GroupResult:
    """A formed group: every member's parsed metadata (the weight is the one its own blob
    claims; a member whose metadata was malformed is only in `missing`), the contributions that
    arrived intact (this peer's own included), why the others did not, which of those served
    something provably bad, and this peer's costs."""

    members: list[MemberMeta]
    contributions: dict[str, Params]
    missing: dict[str, str] = field(default_factory=dict)
    offences: set[str] = field(default_factory=set)  # missing for what they themselves served
    bytes_sent: int = 0
    bytes_received: int = 0
    matchmaking_s: float = 0.0
    transfer_s: float = 0.0
    attempts: int = 1
    # committed in matchmaking, then not served to us: the member answered "unknown blob"
    # until the reveal wait ended. A network failure is not counted here (a relayed honest
    # member can miss the wait), nor a sha256 other than the committed one (a leader can
    # alter that)
    withheld: set[str] = field(default_factory=set)

    def member(self, peer: str) -> MemberMeta | None:
        """The metadata `peer` gathered, or None when it is not a (well-formed) member."""
        return next((m for m in self.members if m.peer == peer), None)


def finite_number(value: Any) -> bool:
    """True for an int/float that is finite (gathered metadata is untrusted)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
