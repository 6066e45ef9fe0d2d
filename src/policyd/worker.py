"""One thread for blocking work (files, sqlite3), called from the event loop.

It does what ``loop.run_in_executor`` on a one-thread pool does, at a fraction of its cost
per call (no concurrent Future, work item or semaphore: a queue put and one wake-up back),
which matters on the answers' path: every batch of answers waits for one call here.
Calls run one at a time, in the order made.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class WorkerThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) in the thread; its result, or its exception raised here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._start()
        self._jobs.put((function, args, loop, future))
        return await future

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self.name}: thread stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, args, loop, future = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = function(*args)
            except BaseException as raised:  # handed to the caller, whatever it is
                error = raised
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more
            del job, function, args, future, result, error

    def stop(self) -> None:
        """No more calls; the thread ends after those queued (it does not hold up exit)."""
        with self._lock:
            self._stopped = True
            if self._thread is not None:
                self._jobs.put(None)
