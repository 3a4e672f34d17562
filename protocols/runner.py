"""An asyncio event loop on a daemon thread, so synchronous code can host async p2p handlers.

The training loop is plain blocking Python; hivemind's P2P, DHT and our blob server are
asyncio. `LoopThread` keeps one loop alive for the node's lifetime and lets the blocking side
hand coroutines to it and wait for their results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """Owns an asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str = "swarmtune-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop; schedule on it only through thread-safe calls."""
        return self._loop

    @property
    def is_running(self) -> bool:
        """True until `shutdown` has stopped the loop."""
        return not self._closed and self._thread.is_alive()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop and return a future for its result."""
        with self._lock:
            if self._closed:
                coro.close()  # avoids a "coroutine was never awaited" warning
                raise RuntimeError("LoopThread is shut down")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Block for `coro`'s result; on timeout cancel it and raise TimeoutError."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "LoopThread.run called from its own loop; await the coroutine instead"
            )
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine itself raised TimeoutError: keep it as is
                raise
            future.cancel()
            raise TimeoutError(f"coroutine did not finish within {timeout:g} s") from None

    def shutdown(self, join_timeout: float | None = 10.0) -> None:
        """Cancel pending tasks, stop the loop and join the thread; safe to call twice."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.shutdown called from its own loop")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(join_timeout)
        if self._thread.is_alive():
            logger.warning("event loop thread %s did not stop in time", self._thread.name)

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._cancel_pending()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _cancel_pending(self) -> None:
        # Pending handlers get to run their `finally` blocks (closing streams) before the loop dies.
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        if tasks:
            gathered = asyncio.gather(*tasks, return_exceptions=True)
            self._loop.run_until_complete(gathered)
