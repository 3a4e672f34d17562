"""Group all-reduce of named tensors over hivemind's DecentralizedAverager (one prefix per group).

hivemind averages in place and may fail silently for part of a group; this wrapper only moves
tensors and the all-gathered metadata and checks that what came back is well-formed (names,
shapes, finiteness). Whether the average is *right* is checked by the caller (checksums).

Bit-identical results: hivemind hands each peer `local + (avg - local)`, which differs from `avg`
by an ulp from peer to peer. We average `x + 1` instead of `x`: while |x| <= 0.5 every value
lies in [0.5, 2), so by Sterbenz's lemma `avg - local` is exact and every peer ends with the
same bits (absolute resolution 2^-23 ~ 1.2e-7, below a round's pseudo-gradient noise). Larger
values are still averaged correctly, only possibly not bit-identically. Only fp32 goes on the
wire: hivemind returns `avg - local` in fp16 under Float16Compression while a reducer's own part
skips compression, so fp16 results differ between members and no offset can repair that.

Only members of the same round and start state meet: the round and a prefix of the start digest
are encoded in the group key bits before every step, so a stalled or stale peer forms its own
group instead of voiding everyone else's round. hivemind's own retries are off: a failed
all-reduce may have half-updated the tensors in place, so each attempt rewrites them first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import NoCompression
from hivemind.dht import DHT
from hivemind.p2p import P2PDaemonError, P2PHandlerError

_MATCHMAKING_STAGES = (
    AveragingStage.IDLE,
    AveragingStage.LOOKING_FOR_GROUP,
    AveragingStage.AWAITING_TRIGGER,
)
BYTES_PER_VALUE = 4
WIRE_OFFSET = 1.0  # added before and removed after averaging (module docstring)
ROUND_BITS, DIGEST_BITS = 20, 12
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
    """No group, a broken all-reduce, or a malformed result; one line."""


@dataclass(frozen=True)
class MemberMeta:
    """What each member tells its group along with its pseudo-gradient (all-gathered)."""

    peer: str
    round: int
    start_digest: str
    weight: float
    checksum: float
    known: int = 1  # volunteers this member knows of (for GHBM tau = auto)

    def gather(self) -> dict[str, Any]:
        """The wire form sent through hivemind's all-gather."""
        return {
            "round": self.round,
            "start": self.start_digest,
            "weight": self.weight,
            "checksum": self.checksum,
            "known": self.known,
        }


def parse_member(peer_id: str, raw: Any) -> MemberMeta | None:
    """MemberMeta from untrusted gathered data, or None when malformed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("start"), str):
        return None
    fields = [raw.get("round"), raw.get("weight"), raw.get("checksum")]
    if not all(finite_number(v) for v in fields) or raw["weight"] < 0:
        return None
    known = raw.get("known", 1)
    if not isinstance(known, int) or not 1 <= known <= 1_000_000:
        known = 1
    return MemberMeta(
        peer_id,
        int(raw["round"]),
        raw["start"][:64],
        float(raw["weight"]),
        float(raw["checksum"]),
        known,
    )


@dataclass
class AllReduceOutcome:
    """Averaged tensors, every member's gathered metadata (parsed; None if malformed), costs."""

    averaged: dict[str, torch.Tensor]
    members: dict[str, MemberMeta | None]
    bytes_sent: int
    bytes_received: int
    matchmaking_s: float
    allreduce_s: float
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


class GroupAverager:
    """Weighted all-reduce of a fixed set of named tensors with whoever joins the same prefix."""

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        template: Mapping[str, torch.Tensor],
        *,
        matchmaking_time: float = 5.0,
        allreduce_timeout: float = 60.0,
        min_group_size: int = 2,
        target_group_size: int | None = None,
    ) -> None:
        self.names = sorted(template)
        self.shapes = {k: tuple(template[k].shape) for k in self.names}
        self.numel = sum(template[k].numel() for k in self.names)
        self.matchmaking_time = matchmaking_time
        self.prefix = prefix
        with _signal_handlers_kept():
            self.averager = DecentralizedAverager(
                [torch.zeros_like(template[k], dtype=torch.float32) for k in self.names],
                dht,
                prefix=prefix,
                start=True,
                initial_group_bits="0" * (ROUND_BITS + DIGEST_BITS),
                min_group_size=min_group_size,
                target_group_size=target_group_size,
                min_matchmaking_time=matchmaking_time,
                request_timeout=min(1.0, matchmaking_time / 2),
                allreduce_timeout=allreduce_timeout,
                compression=NoCompression(),
            )

    def all_reduce(
        self, tensors: Mapping[str, torch.Tensor], meta: MemberMeta, timeout: float
    ) -> AllReduceOutcome:
        """Average `tensors` with the members of meta's round and start state that show up
        within `timeout` seconds; a failed attempt is retried (tensors rewritten) until then."""
        if set(tensors) != set(self.names):
            raise AveragingError("tensor names differ from the averager's template")
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        attempts, last_error = 0, "no attempt"
        while attempts == 0 or time.monotonic() + self.matchmaking_time < deadline:
            attempts += 1
            self._write(tensors)
            self.averager.set_group_bits(group_bits(meta.round, meta.start_digest))
            try:
                control = self.averager.step(
                    weight=meta.weight,
                    gather=meta.gather(),
                    timeout=max(deadline - time.monotonic(), self.matchmaking_time + 0.5),
                    allow_retries=False,
                    wait=False,
                )
                matchmaking_s = _time_until_allreduce(control, started)
                gathered = control.result()
            except _STEP_FAILURES as exc:
                last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            if gathered:
                return self._outcome(gathered, started, matchmaking_s, attempts)
            last_error = "averager returned no group"
        raise AveragingError(f"{last_error} (after {attempts} attempts)")

    def _write(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with self.averager.get_tensors() as local:
            for slot, name in zip(local, self.names, strict=True):
                slot.copy_(tensors[name]).add_(WIRE_OFFSET)

    def _outcome(
        self, gathered: Mapping[Any, Any], started: float, matchmaking_s: float, attempts: int
    ) -> AllReduceOutcome:
        averaged = self._read_back()
        size = len(gathered)
        # hivemind's butterfly all-reduce: each peer ships (g-1)/g of its tensor out, and the
        # same share of averaged parts back; this is the payload, not counting framing.
        payload = int(2 * (size - 1) / size * self.numel * BYTES_PER_VALUE)
        members = {str(p): parse_member(str(p), raw) for p, raw in gathered.items()}
        elapsed = time.perf_counter() - started
        return AllReduceOutcome(
            averaged, members, payload, payload, matchmaking_s, elapsed - matchmaking_s, attempts
        )

    def _read_back(self) -> dict[str, torch.Tensor]:
        with self.averager.get_tensors() as local:
            averaged = {
                name: slot.detach().clone().sub_(WIRE_OFFSET)
                for slot, name in zip(local, self.names, strict=True)
            }
        for name, tensor in averaged.items():
            if tuple(tensor.shape) != self.shapes[name] or not torch.isfinite(tensor).all():
                raise AveragingError(f"averaged tensor {name} is malformed or not finite")
        return averaged

    def shutdown(self) -> None:
        """Stop the averager process."""
        if self.averager.is_alive():
            self.averager.shutdown()


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


def _time_until_allreduce(control: StepControl, started: float) -> float:
    """Seconds from `started` until the step left matchmaking (polled; 10 ms resolution)."""
    while not control.done() and control.stage in _MATCHMAKING_STAGES:
        time.sleep(0.01)
    return time.perf_counter() - started


def finite_number(value: Any) -> bool:
    """True for an int/float that is finite (gathered metadata is untrusted)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
