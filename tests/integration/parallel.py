"""Run one callable per member in threads, as peers of one group do at the same time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_members(work: Callable[[int], T], count: int, timeout: float = 90.0) -> list[T]:
    """work(0..count-1) in parallel threads; every result, in member order. A member whose
    call raises records the exception as its result (a failed exchange is a result here)."""
    results: list[object] = [None] * count

    def one(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - returned to the test, which checks it
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a member did not return"
    return results  # type: ignore[return-value]
