"""Group exchange: hivemind's matchmaking forms the group, then every member's contribution is
all-gathered over swarmtune's blob protocol, so each member aggregates the same bytes itself.

Why not hivemind's butterfly all-reduce: when a reducer's stream to one member breaks, hivemind
fills that member's share with the member's own values (`register_failed_reducer`) and reports
success. That member silently ends with another average than the rest of its group, which is
how honest demo rounds were rejected. It also returns fp16 results that differ between members
(a reducer's own part skips compression), and every reducer sees and controls its part of the
result. Here a contribution is a safetensors blob whose sha256 and size every member announces
in the group's all-gathered metadata; whoever fetches it gets exactly those bytes or an error,
and aggregation is plain deterministic arithmetic in the caller (aggregation/). The blob is
served only once the group has formed (commit, then reveal): the sha256 is committed before
any member can see another's contribution of the round. The blob's own header carries the
member's claims (peer, round, start state, weight); fetched from the member itself, they are
what the member said, not what the group's leader relayed.

Only members of the same round and start state meet: the round and a prefix of the start digest
are encoded in the group key bits before every attempt, so a stalled or stale peer forms its
own group instead of joining everyone else's. The averager's own tensor is a single number:
hivemind's all-reduce on it only completes the group formation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from hivemind import DHT
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.utils import get_dht_time
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from swarmtune.aggregation.codec import from_int8_blocks, int8_blocks, n_blocks
from swarmtune.protocols.admission import Gate
from swarmtune.protocols.group import (
    GroupResult,
    MemberMeta,
    finite_number,
    parse_member,
    parse_step_s,
)
from swarmtune.protocols.matchmaking import GatedAverager, RefusedSet
from swarmtune.protocols.routing import SUSPECT_WAIT_S, BlobRouter
from swarmtune.protocols.transfer import NotServed, TransferError

ROUND_BITS, DIGEST_BITS = 20, 12
POLL_S = 0.5
_MATCHMAKING_STAGES = (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
# Wire dtypes of a contribution. Every member decodes the same bytes, its own blob included, so
# fp16 halves the bytes and still leaves all members bit-identical.
CODECS = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}  # wire dtypes
# int8: every tensor's codes, then every tensor's block scales, each concatenated in name
# order into one tensor: a safetensors header entry per adapter tensor would cost more than the
# scales (0.31x of fp32's bytes instead of 0.27x for the embedded base's adapter)
CODES, SCALES = "int8.codes", "int8.absmax"
# What a step's future raises when there was no group or the group broke (the averager process
# sets these; AssertionError is how hivemind reports a group that disagrees on its own layout).
_STEP_FAILURES = (
    AllreduceException,
    MatchmakingException,
    P2PDaemonError,
    P2PHandlerError,
    AssertionError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncio.CancelledError,
    concurrent.futures.CancelledError,
    # a stream to a member reset under load (seen from a relayed peer): one failed attempt
    ConnectionError,
)


class AveragingError(RuntimeError):
    """No group formed in time; one line."""


def group_bits(round_: int, start_digest: str) -> str:
    """Group key bits: the round (mod 2^20) and 12 bits of the start digest, so that only
    members of the same round and start state are matched."""
    try:
        digest_bits = int(start_digest[:3], 16)
    except ValueError:
        digest_bits = 0
    return format(round_ % (1 << ROUND_BITS), f"0{ROUND_BITS}b") + format(
        digest_bits, f"0{DIGEST_BITS}b"
    )


def encode_contribution(
    tensors: Mapping[str, torch.Tensor], meta: MemberMeta, codec: str = "fp32"
) -> bytes:
    """Named tensors -> safetensors bytes in the codec's dtype (no pickle: peers are untrusted).
    The header carries who made it, for which round and start state, its weight and its
    seconds per inner step: fetched
    from the member itself over an authenticated stream, these are the member's own claims
    (the group's gathered metadata is relayed by its leader and could be altered on the way)."""
    header = {"peer": meta.peer, "round": meta.round, "start": meta.start_digest}
    header["weight"] = meta.weight
    header["step_s"] = meta.step_s
    payload: dict[str, torch.Tensor] = {}
    if codec == "int8":
        parts = [int8_blocks(tensors[name]) for name in sorted(tensors)]
        payload[CODES] = torch.cat([codes.reshape(-1) for codes, _ in parts])
        payload[SCALES] = torch.cat([scales for _, scales in parts])
    else:
        for name in sorted(tensors):
            payload[name] = tensors[name].detach().to(CODECS[codec]).contiguous()
    return st_save(payload, metadata={"swarmtune": json.dumps(header, sort_keys=True)})


def decode_contribution(
    blob: bytes, shapes: Mapping[str, tuple[int, ...]], codec: str = "fp32"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Bytes -> (named fp32 tensors with exactly the expected names, shapes and codec dtype, all
    finite; the header's claims); ValueError (one line) otherwise."""
    try:
        tensors = st_load(blob)
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(json.loads(blob[8 : 8 + size])["__metadata__"]["swarmtune"])
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same malformed blob
        raise ValueError(f"not a contribution blob ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("contribution header is not a mapping")
    if codec == "int8":
        if set(tensors) != {CODES, SCALES}:
            raise ValueError("tensor names differ from an int8 contribution's")
        return _from_int8(tensors[CODES], tensors[SCALES], shapes), header
    if set(tensors) != set(shapes):
        raise ValueError("tensor names differ from the run's adapter")
    decoded = {}
    for name in sorted(shapes):
        tensor = tensors[name]
        if tensor.dtype != CODECS[codec] or tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} is not the run's")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} is not finite")
        else:
            decoded[name] = tensor.to(torch.float32)
    return decoded, header


def _from_int8(
    codes: torch.Tensor, scales: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The fp32 tensors of an int8 contribution (codes and scales concatenated in name order);
    ValueError unless both are exactly what the encoder makes for the run's shapes: int8 codes
    within +-127, one fp32 scale per block of each tensor, finite and >= 0."""
    sizes = [math.prod(shapes[name]) for name in sorted(shapes)]
    blocks = [n_blocks(size) for size in sizes]
    if codes.dtype != torch.int8 or tuple(codes.shape) != (sum(sizes),):
        raise ValueError(f"int8 codes {codes.dtype} {tuple(codes.shape)} do not fit the adapter")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (sum(blocks),):
        raise ValueError(f"block scales {scales.dtype} {tuple(scales.shape)} do not fit")
    if not (torch.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError("block scales are not finite and non-negative")
    if codes.numel() and int(codes.min()) < -127:
        raise ValueError("int8 code -128 is not used by the codec")
    decoded = {}
    for name, part, part_scales in zip(
        sorted(shapes), codes.split(sizes), scales.split(blocks), strict=True
    ):
        decoded[name] = from_int8_blocks(part.reshape(shapes[name]), part_scales)
    return decoded


def check_header(header: Mapping[str, Any], member: MemberMeta) -> str | None:
    """Why a fetched contribution's own header disagrees with the member and round it was
    fetched for (None when it agrees and its weight is a finite positive number)."""
    if header.get("peer") != member.peer:
        return "contribution header names another peer"
    if header.get("round") != member.round or header.get("start") != member.start_digest:
        return "contribution header is for another round or start state"
    weight: Any = header.get("weight")
    if not (finite_number(weight) and weight > 0):
        return f"contribution header weight {weight!r} is not a positive number"
    return None


SUSPECT_ROUNDS = 10  # how long a withholder stays suspected without withholding again


class GroupAverager:
    """Forms groups under one prefix and all-gathers the members' contributions."""

    def __init__(
        self,
        dht: DHT,
        routes: BlobRouter,
        prefix: str,
        template: Mapping[str, torch.Tensor],
        *,
        codec: str = "fp32",
        matchmaking_time: float = 5.0,
        allreduce_timeout: float = 60.0,
        min_group_size: int = 2,
        target_group_size: int | None = None,
        gate: Gate | None = None,
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
        self.codec = codec
        self.routes = routes  # our blobs served (routes.server), others' fetched
        self.prefix = prefix
        self.shapes = {k: tuple(template[k].shape) for k in sorted(template)}
        # the values plus a safetensors header (names, shapes): a bound on any honest blob
        self.max_blob = 4 * sum(template[k].numel() for k in template) + (1 << 16)
        self.matchmaking_time = matchmaking_time
        self.transfer_timeout = allreduce_timeout
        self._published: str | None = None
        self.gate = gate  # token runs: members without a valid ticket are refused
        self.refused: dict[str, str] = {}  # revoked or banned peers, with the reason
        # peer -> the last round it committed a contribution and did not serve it: it gets
        # SUSPECT_WAIT_S, not the full reveal wait, until it serves one again
        self.suspects: dict[str, int] = {}
        self._refused_shared = RefusedSet()
        with _signal_handlers_kept():
            self.averager = GatedAverager(
                [torch.zeros(1)],
                dht,
                prefix=prefix,
                start=True,
                initial_group_bits="0" * (ROUND_BITS + DIGEST_BITS),
                min_group_size=min_group_size,
                target_group_size=target_group_size,
                min_matchmaking_time=matchmaking_time,
                request_timeout=min(3.0, matchmaking_time / 2),
                # the all-reduce only closes group formation (one number): when a member that
                # the leader counted in never got the group, the others must not wait long
                allreduce_timeout=max(5.0, matchmaking_time),
                gate=gate,
                refused=self._refused_shared,
                # a relayed peer's DHT is a client, but it still leads and answers joins
                # (through its relay): hivemind would otherwise make it a client averager
                client_mode=False,
            )

    def set_refused(self, refused: Mapping[str, str]) -> None:
        """Peers to keep out of groups from now on (peer -> reason): refused in matchmaking when
        we lead, and their contributions excluded when someone else let them in."""
        if dict(refused) != self.refused:
            self.refused = dict(refused)
            self._refused_shared.update(set(refused))

    @property
    def refused_joins(self) -> int:
        """Join requests this peer turned away as a leader (unadmitted, revoked or banned)."""
        return int(self._refused_shared.refused_joins.value)

    def exchange(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: MemberMeta,
        timeout: float,
        moved_on: Callable[[], bool] = lambda: False,
        window: float | None = None,
        expected: int = 0,
    ) -> GroupResult:
        """Publish `tensors`, join a group of meta's round and start state within `timeout`
        seconds (failed attempts are retried), then fetch every other member's contribution.
        While still looking for a group, `moved_on()` (polled) says the group already finished
        this round: waiting longer is pointless, so the attempt ends at once. `window` widens
        the first attempt's matchmaking window (default: the averager's). `expected` (members
        known to hold this round's start state, ourselves included) lets a leader close the
        group as soon as they are in; 0 waits out the window."""
        if set(tensors) != set(self.shapes):
            raise AveragingError("tensor names differ from the averager's template")
        blob, meta = self._commit(tensors, meta)
        self.averager.expect(expected)
        started = time.perf_counter()
        gathered, matchmaking_s, attempts = self._form_group(meta, timeout, moved_on, window)
        # commit, then reveal: the group gathered every member's sha256 before anyone's blob
        # can be fetched, so nobody can choose its contribution knowing this round's others
        self._publish(f"contribution:{self.prefix}:{meta.round}", self._revealed(blob))
        members = {str(p): parse_member(str(p), raw) for p, raw in gathered.items()}
        contributions, missing, offences, received, withheld = self._fetch_all(members, meta)
        contributions[meta.peer] = decode_contribution(blob, self.shapes, self.codec)[0]
        members[meta.peer] = meta  # our own entry as we sent it, not as the leader relayed it
        return GroupResult(
            [m for m in members.values() if m is not None],
            contributions,
            missing,
            offences,
            len(blob) * (len(members) - 1),
            received,
            matchmaking_s,
            time.perf_counter() - started - matchmaking_s,
            attempts,
            withheld,
        )

    def expect(self, members: int) -> None:
        """Change how many members (ourselves included) close the group being formed: a join
        after this counts against the new number."""
        self.averager.expect(members)

    def _commit(
        self, tensors: Mapping[str, torch.Tensor], meta: MemberMeta
    ) -> tuple[bytes, MemberMeta]:
        """Our blob, and our metadata with its sha256 and size (the commitment)."""
        blob = encode_contribution(
            tensors, dataclasses.replace(meta, sha256="", size=0), self.codec
        )
        return blob, dataclasses.replace(
            meta, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)
        )

    def _revealed(self, blob: bytes) -> bytes:
        """What we serve once the group formed: the committed blob (tests/attackers/averager.py
        overrides this to test what members do with a liar)."""
        return blob

    def _gathered(self, meta: MemberMeta) -> dict[str, Any]:
        """What we tell the group in matchmaking (overridden in tests/attackers/averager.py)."""
        return meta.gather()

    def _publish(self, name: str, blob: bytes) -> None:
        # the previous round's blob stays up until now: slow members may still be fetching it
        if self._published is not None and self._published != name:
            self.routes.server.unpublish(self._published)
        self.routes.server.publish(name, blob)
        self._published = name

    def _form_group(
        self,
        meta: MemberMeta,
        timeout: float,
        moved_on: Callable[[], bool],
        window: float | None,
    ) -> tuple[dict[Any, Any], float, int]:
        """hivemind matchmaking with our key bits; returns (gathered, seconds, attempts)."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        attempts, last_error = 0, "no attempt"
        while attempts == 0 or time.monotonic() + self.matchmaking_time < deadline:
            attempts += 1
            self.averager.set_group_bits(group_bits(meta.round, meta.start_digest))
            first_window = window if attempts == 1 and window else self.matchmaking_time
            try:
                control = self.averager.step(
                    scheduled_time=get_dht_time() + first_window,
                    weight=1.0,
                    gather=self._gathered(meta),
                    timeout=max(deadline - time.monotonic(), self.matchmaking_time + 0.5),
                    allow_retries=False,
                    wait=False,
                )
                gathered = _result_unless(control, moved_on)
            except _STEP_FAILURES as exc:
                last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            if gathered:
                return gathered, time.perf_counter() - started, attempts
            last_error = "averager returned no group"
        raise AveragingError(f"{last_error} (after {attempts} attempts)")

    def _fetch_all(
        self, members: dict[str, MemberMeta | None], mine: MemberMeta
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str], set[str], int, set[str]]:
        """Every other member's contribution, fetched in parallel and checked; (found, missing
        with reasons, offenders, bytes received, withheld: those that answered and did not
        serve what they committed). A member's weight and step time are
        replaced by the ones its own blob claims. A withholder waits SUSPECT_WAIT_S, not the
        full reveal wait, in the rounds after, until it serves again: it costs one wait. Nothing is fetched from a member of another round or start
        state (the round names those: node/engine/round.py, select_contributions, decides what
        enters the aggregate), nor from one we must not take bytes from: refused (revoked or
        banned), unadmitted, or declaring more bytes than an adapter has; those are missing,
        with the reason."""
        wanted = {
            p: m for p, m in members.items() if p != mine.peer and m is not None and _same(m, mine)
        }
        missing = {p: "malformed metadata" for p, m in members.items() if m is None}
        for peer, member in list(wanted.items()):
            why = self.refused.get(peer)
            if why is None and self.gate is not None:
                ticket_problem = self.gate.check(peer, member.ticket)
                why = f"not admitted: {ticket_problem}" if ticket_problem else None
            if why is None and member.size > self.max_blob:
                why = f"declares {member.size} bytes, more than the adapter's"
            if why is not None:
                missing[peer] = why
                del wanted[peer]
        name = f"contribution:{self.prefix}:{mine.round}"
        blobs = self.routes.fetch_many(
            {p: (name, m.sha256, m.size) for p, m in wanted.items()},
            self.transfer_timeout,
            {p: SUSPECT_WAIT_S for p in wanted if p in self.suspects},
        )
        found: dict[str, dict[str, torch.Tensor]] = {}
        offences: set[str] = set()
        withheld: set[str] = set()
        received = 0
        for peer, blob in blobs.items():
            if isinstance(blob, TransferError):  # the network, or a leader that altered the sha
                missing[peer] = _brief(str(blob))
                if isinstance(blob, NotServed):  # it answered, and did not serve what it committed
                    withheld.add(peer)
                continue
            self.suspects.pop(peer, None)  # it served: its next reveal gets the full wait again
            received += len(blob)
            try:  # these bytes came from `peer` itself and match the group's commitment
                tensors, header = decode_contribution(blob, self.shapes, self.codec)
                why = check_header(header, wanted[peer])
            except ValueError as exc:
                tensors, why = {}, str(exc)
            if why is not None:
                missing[peer], offences = why, offences | {peer}
                continue
            found[peer] = tensors
            members[peer] = dataclasses.replace(
                wanted[peer],
                weight=float(header["weight"]),
                step_s=parse_step_s(header.get("step_s")),
            )
        self._suspect(withheld, mine.round)
        return found, missing, offences, received, withheld

    def _suspect(self, withheld: set[str], round_: int) -> None:
        """Remember this round's withholders; forget any that has not withheld for
        SUSPECT_ROUNDS rounds (a Sybil's throwaway identities must not pile up)."""
        self.suspects.update(dict.fromkeys(withheld, round_))
        self.suspects = {p: r for p, r in self.suspects.items() if r > round_ - SUSPECT_ROUNDS}

    def shutdown(self) -> None:
        """Stop the averager process and stop serving our contribution."""
        if self._published is not None:
            self.routes.server.unpublish(self._published)
        if self.averager.is_alive():
            self.averager.shutdown()


def _result_unless(control: StepControl, moved_on: Callable[[], bool]) -> Any:
    """The step's gathered data; polls `moved_on` while matchmaking and cancels the step (and
    raises AveragingError) when it says the group is gone."""
    while True:
        try:
            return control.result(timeout=POLL_S)
        except TimeoutError:
            if control.done():  # the step itself failed with a timeout
                raise
            if control.stage in _MATCHMAKING_STAGES and moved_on():
                control.cancel()
                raise AveragingError("the group already finished this round") from None


def _same(member: MemberMeta, mine: MemberMeta) -> bool:
    return member.round == mine.round and member.start_digest == mine.start_digest


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Starting a DecentralizedAverager sets SIGINT to SIG_IGN in *this* process and leaves it
    so; a volunteer that opens a new averager mid-run (moving to a cluster) would then ignore
    Ctrl+C. Restore the handlers we had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def _brief(error: str, limit: int = 200) -> str:
    """An error for the log, cut in the middle: its start says what was fetched, its end why
    it failed (a relayed fetch's blob name alone fills most of a line)."""
    if len(error) <= limit:
        return error
    return error[: limit // 3] + " ... " + error[-(2 * limit) // 3 :]
