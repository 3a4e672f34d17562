"""LoopThread: results, exceptions, timeouts with cancellation, idempotent shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from swarmtune.protocols.runner import LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.shutdown()


def test_run_returns_result_computed_on_the_loop_thread(loop_thread: LoopThread) -> None:
    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert loop_thread.run(where()) == "swarmtune-loop"


def test_run_reraises_the_coroutine_exception(loop_thread: LoopThread) -> None:
    async def boom() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        loop_thread.run(boom())


def test_coroutine_raising_timeout_error_is_not_mistaken_for_our_timeout(
    loop_thread: LoopThread,
) -> None:
    async def own_timeout() -> None:
        raise TimeoutError("from inside")

    with pytest.raises(TimeoutError, match="from inside"):
        loop_thread.run(own_timeout(), timeout=5)


def test_run_timeout_cancels_the_coroutine(loop_thread: LoopThread) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        loop_thread.run(forever(), timeout=0.2)
    assert time.monotonic() - started < 5
    assert cancelled.wait(5), "the timed-out coroutine kept running"


def test_submit_returns_a_concurrent_future(loop_thread: LoopThread) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0.01)
        return 2 * x

    futures = [loop_thread.submit(double(i)) for i in range(5)]
    assert [f.result(timeout=5) for f in futures] == [0, 2, 4, 6, 8]


def test_run_from_inside_the_loop_is_refused_instead_of_deadlocking(
    loop_thread: LoopThread,
) -> None:
    async def inner() -> int:
        return 1

    async def nested() -> int:
        return loop_thread.run(inner())

    with pytest.raises(RuntimeError, match="own loop"):
        loop_thread.run(nested(), timeout=5)


def test_shutdown_is_idempotent_and_cancels_pending_tasks() -> None:
    runner = LoopThread()
    cleaned_up = threading.Event()

    async def pending() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned_up.set()

    future = runner.submit(pending())
    time.sleep(0.05)
    runner.shutdown()
    runner.shutdown()
    assert cleaned_up.is_set()
    assert future.cancelled()
    assert not runner.is_running
    assert runner.loop.is_closed()
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit(asyncio.sleep(0))


def test_context_manager_shuts_down() -> None:
    with LoopThread() as runner:
        assert runner.run(asyncio.sleep(0, result=7)) == 7
    assert not runner.is_running
