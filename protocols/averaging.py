"""Group exchange: hivemind's matchmaking forms the group, then every member's contribution is
all-gathered over swarmtune's blob protocol, so each member aggregates the same bytes itself.

Why not hivemind's butterfly all-reduce: when a reducer's stream to one member breaks, hivemind
fills that member's share with the member's own values (`register_failed_reducer`) and reports
success. That member silently ends with another average than the rest of its group, which is
how honest demo rounds were rejected. It also returns fp16 results that differ between members
(a reducer's own part skips compression), and every reducer sees and controls its part of the
result. Here a contribution is a safetensors blob whose sha256 and size every member announces
in the group's all-gathered metadata; whoever fetches it gets exactly those bytes or an error,
and aggregation is plain deterministic arithmetic in the caller (aggregation/).

Only members of the same round and start state meet: the round and a prefix of the start digest
are encoded in the group key bits before every attempt, so a stalled or stale peer forms its
own group instead of joining everyone else's. The averager's own tensor is a single number:
hivemind's all-reduce on it only completes the group formation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.utils import get_dht_time
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protocols.swarm import SwarmNode
from protocols.transfer import TransferError

ROUND_BITS, DIGEST_BITS = 20, 12
POLL_S = 0.5
_MATCHMAKING_STAGES = (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
# Wire dtypes of a contribution. Every member decodes the same bytes, its own blob included, so
# fp16 halves the bytes and still leaves all members bit-identical.
CODECS = {"fp32": torch.float32, "fp16": torch.float16}
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
)


class AveragingError(RuntimeError):
    """No group formed in time; one line."""


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

    def gather(self) -> dict[str, Any]:
        """The wire form sent through hivemind's all-gather."""
        return {
            "round": self.round,
            "start": self.start_digest,
            "weight": self.weight,
            "sha256": self.sha256,
            "size": self.size,
            "known": self.known,
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
    return MemberMeta(peer_id, int(raw["round"]), start, float(raw["weight"]), sha, size, known)


@dataclass
class GatherOutcome:
    """Every member's parsed metadata (None if malformed), the contributions that arrived intact
    (this peer's own included), why the others are missing, and this peer's costs."""

    members: dict[str, MemberMeta | None]
    contributions: dict[str, dict[str, torch.Tensor]]
    missing: dict[str, str]
    bytes_sent: int
    bytes_received: int
    matchmaking_s: float
    transfer_s: float
    attempts: int = 1


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


def encode_contribution(tensors: Mapping[str, torch.Tensor], codec: str = "fp32") -> bytes:
    """Named tensors -> safetensors bytes in the codec's dtype (no pickle: peers are untrusted)."""
    dtype = CODECS[codec]
    return st_save({k: tensors[k].detach().to(dtype).contiguous() for k in sorted(tensors)})


def decode_contribution(
    blob: bytes, shapes: Mapping[str, tuple[int, ...]], codec: str = "fp32"
) -> dict[str, torch.Tensor]:
    """Bytes -> named fp32 tensors with exactly the expected names, shapes and codec dtype, all
    finite; ValueError (one line) otherwise."""
    try:
        tensors = st_load(blob)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same malformed blob
        raise ValueError(f"not a safetensors blob ({type(exc).__name__})") from None
    if set(tensors) != set(shapes):
        raise ValueError("tensor names differ from the run's adapter")
    for name, tensor in tensors.items():
        if tensor.dtype != CODECS[codec] or tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} is not the run's")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} is not finite")
    return {k: v.to(torch.float32) for k, v in tensors.items()}


class GroupAverager:
    """Forms groups under one prefix and all-gathers the members' contributions."""

    def __init__(
        self,
        node: SwarmNode,
        prefix: str,
        template: Mapping[str, torch.Tensor],
        *,
        codec: str = "fp32",
        matchmaking_time: float = 5.0,
        allreduce_timeout: float = 60.0,
        min_group_size: int = 2,
        target_group_size: int | None = None,
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
        self.codec = codec
        self.node = node
        self.prefix = prefix
        self.shapes = {k: tuple(template[k].shape) for k in sorted(template)}
        # the values plus a safetensors header (names, shapes): a bound on any honest blob
        self.max_blob = 4 * sum(template[k].numel() for k in template) + (1 << 16)
        self.matchmaking_time = matchmaking_time
        self.transfer_timeout = allreduce_timeout
        self._published: str | None = None
        with _signal_handlers_kept():
            self.averager = DecentralizedAverager(
                [torch.zeros(1)],
                node.dht,
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
            )

    def exchange(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: MemberMeta,
        timeout: float,
        moved_on: Callable[[], bool] = lambda: False,
        window: float | None = None,
    ) -> GatherOutcome:
        """Publish `tensors`, join a group of meta's round and start state within `timeout`
        seconds (failed attempts are retried), then fetch every other member's contribution.
        While still looking for a group, `moved_on()` (polled) says the group already finished
        this round: waiting longer is pointless, so the attempt ends at once. `window` widens
        the first attempt's matchmaking window (default: the averager's)."""
        if set(tensors) != set(self.shapes):
            raise AveragingError("tensor names differ from the averager's template")
        blob = encode_contribution(tensors, self.codec)
        meta = MemberMeta(
            meta.peer,
            meta.round,
            meta.start_digest,
            meta.weight,
            hashlib.sha256(blob).hexdigest(),
            len(blob),
            meta.known,
        )
        self._publish(f"contribution:{self.prefix}:{meta.round}", blob)
        started = time.perf_counter()
        gathered, matchmaking_s, attempts = self._form_group(meta, timeout, moved_on, window)
        members = {str(p): parse_member(str(p), raw) for p, raw in gathered.items()}
        contributions, missing, received = self._fetch_all(members, meta)
        contributions[meta.peer] = decode_contribution(blob, self.shapes, self.codec)
        return GatherOutcome(
            members,
            contributions,
            missing,
            len(blob) * (len(members) - 1),
            received,
            matchmaking_s,
            time.perf_counter() - started - matchmaking_s,
            attempts,
        )

    def _publish(self, name: str, blob: bytes) -> None:
        # the previous round's blob stays up until now: slow members may still be fetching it
        if self._published is not None and self._published != name:
            self.node.blobs.unpublish(self._published)
        self.node.blobs.publish(name, blob)
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
                    gather=meta.gather(),
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
        self, members: Mapping[str, MemberMeta | None], mine: MemberMeta
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str], int]:
        """Every other member's contribution, fetched in parallel and checked; (found, missing
        with reasons, bytes received)."""
        wanted = {
            p: m for p, m in members.items() if p != mine.peer and m is not None and _same(m, mine)
        }
        missing = {p: "malformed metadata" for p, m in members.items() if m is None}
        for peer, member in list(wanted.items()):
            if member.size > self.max_blob:
                missing[peer] = f"declares {member.size} bytes, more than the adapter's"
                del wanted[peer]
        missing.update(
            {
                p: f"round {m.round} / another start state"
                for p, m in members.items()
                if m is not None and p != mine.peer and not _same(m, mine)
            }
        )
        name = f"contribution:{self.prefix}:{mine.round}"
        blobs = self.node.fetch_many(
            {p: (name, m.sha256, m.size) for p, m in wanted.items()}, self.transfer_timeout
        )
        found: dict[str, dict[str, torch.Tensor]] = {}
        received = 0
        for peer, blob in blobs.items():
            if isinstance(blob, TransferError):
                missing[peer] = str(blob)[:160]
                continue
            received += len(blob)
            try:
                found[peer] = decode_contribution(blob, self.shapes, self.codec)
            except ValueError as exc:
                missing[peer] = str(exc)
        return found, missing, received

    def shutdown(self) -> None:
        """Stop the averager process and stop serving our contribution."""
        if self._published is not None:
            self.node.blobs.unpublish(self._published)
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


def finite_number(value: Any) -> bool:
    """True for an int/float that is finite (gathered metadata is untrusted)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
