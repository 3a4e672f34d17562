"""Group all-reduce of named tensors over hivemind's DecentralizedAverager (one prefix per group).

hivemind averages in place and may fail silently for part of a group; this wrapper only moves
tensors and the all-gathered metadata and checks that what came back is well-formed (names,
shapes, finiteness). Whether the average is *right* is checked by the caller (checksums).

Bit-identical results: hivemind hands each peer `local + (avg - local)`, which differs from `avg`
by an ulp from peer to peer. With the fp32 codec we average `x + 1` instead of `x`: while
|x| <= 0.5 every value lies in [0.5, 2), so by Sterbenz's lemma `avg - local` is exact and every
peer ends with the same bits (absolute resolution ~1e-7, far below a round's pseudo-gradient
noise). Larger values are still averaged correctly, only possibly not bit-identically.
"""

from __future__ import annotations

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
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import Float16Compression, NoCompression
from hivemind.dht import DHT

_MATCHMAKING_STAGES = (
    AveragingStage.IDLE,
    AveragingStage.LOOKING_FOR_GROUP,
    AveragingStage.AWAITING_TRIGGER,
)
CODECS = {"fp32": (NoCompression, 4), "fp16": (Float16Compression, 2)}
EXACT_OFFSET = {"fp32": 1.0, "fp16": 0.0}


class AveragingError(RuntimeError):
    """No group, a broken all-reduce, or a malformed result; one line."""


@dataclass
class AllReduceOutcome:
    """Averaged tensors, every member's gathered metadata (by peer id), and this peer's costs."""

    averaged: dict[str, torch.Tensor]
    gathered: dict[str, Any]
    bytes_sent: int
    bytes_received: int
    matchmaking_s: float
    allreduce_s: float


class GroupAverager:
    """Weighted all-reduce of a fixed set of named tensors with whoever joins the same prefix."""

    def __init__(
        self,
        dht: DHT,
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
        compression, self.bytes_per_value = CODECS[codec]
        self.offset = EXACT_OFFSET[codec]
        self.names = sorted(template)
        self.shapes = {k: tuple(template[k].shape) for k in self.names}
        self.numel = sum(template[k].numel() for k in self.names)
        self.matchmaking_time = matchmaking_time
        with _signal_handlers_kept():
            self.averager = DecentralizedAverager(
                [torch.zeros_like(template[k], dtype=torch.float32) for k in self.names],
                dht,
                prefix=prefix,
                start=True,
                min_group_size=min_group_size,
                target_group_size=target_group_size,
                min_matchmaking_time=matchmaking_time,
                request_timeout=min(1.0, matchmaking_time / 2),
                allreduce_timeout=allreduce_timeout,
                compression=compression(),
            )

    def all_reduce(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        gather: Mapping[str, Any],
        timeout: float,
    ) -> AllReduceOutcome:
        """Average `tensors` with the group formed in the next matchmaking window."""
        if set(tensors) != set(self.names):
            raise AveragingError("tensor names differ from the averager's template")
        with self.averager.get_tensors() as local:
            for slot, name in zip(local, self.names, strict=True):
                slot.copy_(tensors[name]).add_(self.offset)
        started = time.perf_counter()
        try:
            control = self.averager.step(
                weight=weight, gather=dict(gather), timeout=timeout, wait=False
            )
            matchmaking_s = _time_until_allreduce(control, started)
            gathered = control.result()
        except Exception as exc:  # noqa: BLE001 - hivemind raises many kinds; all mean "no average"
            raise AveragingError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        elapsed = time.perf_counter() - started
        if not gathered:
            raise AveragingError("averager returned no group")
        averaged = self._read_back()
        size = len(gathered)
        # hivemind's butterfly all-reduce: each peer ships (g-1)/g of its tensor out, and the
        # same share of averaged parts back; this is the payload, not counting framing.
        payload = int(2 * (size - 1) / size * self.numel * self.bytes_per_value)
        return AllReduceOutcome(
            averaged,
            {str(p): v for p, v in gathered.items()},
            payload,
            payload,
            matchmaking_s,
            elapsed - matchmaking_s,
        )

    def _read_back(self) -> dict[str, torch.Tensor]:
        with self.averager.get_tensors() as local:
            averaged = {
                name: slot.detach().clone().sub_(self.offset)
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
