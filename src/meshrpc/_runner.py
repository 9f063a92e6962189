"""Run a server in a process meshrpc owns, and make sure that process ends.

Unlike ``asyncio.run``, which waits without limit for tasks that ignore cancellation
and for executor threads, every wait here is bounded; what is still running after it
is named in the log and abandoned with ``os._exit``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger("meshrpc.server")
EXIT_WAIT = 1.0  # seconds leftovers get once the server has finished
LAST_WORDS = 0.2  # seconds kept back from a watchdog's deadline to log and exit first
_owned = False
_exit_by: float | None = None  # a watchdog's deadline (time.monotonic()), once one is armed


def exit_by(deadline: float) -> None:
    """A watchdog ends the process at ``deadline``: the runner's last waits end before it."""
    global _exit_by
    _exit_by = deadline if _exit_by is None else min(_exit_by, deadline)


def _wait_time() -> float:
    if _exit_by is None:
        return EXIT_WAIT
    return max(0.0, min(EXIT_WAIT, _exit_by - LAST_WORDS - time.monotonic()))


def _describe(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", None)
    # grpc runs each RPC in a task of its own compiled coroutine: name the RPC instead.
    return f"task {name}" if name and getattr(coro, "cr_frame", None) is not None else "an RPC's task"


def owns_process() -> bool:
    """True inside `run`: the server may end the process (never when embedded in tests)."""
    return _owned


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` in a new event loop and return its exit code, or exit the process."""
    global _owned, _exit_by
    _owned = True
    try:
        return _run(main)
    finally:
        _owned, _exit_by = False, None  # a process may run a server again (tests, a script)


def _run(main: Coroutine[Any, Any, int]) -> int:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    abandoned: list[str] = []
    try:
        code = loop.run_until_complete(main)
        leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=_wait_time()))
        left = [task for task in leftovers if not task.done()]
        if left:
            from ._handlers import running_rpcs

            rpcs = running_rpcs()
            abandoned += [f"RPC {path}" for path in rpcs]
            others = [_describe(task) for task in left]
            # Each RPC named above is one of the unnamed RPC tasks: list only the rest.
            unnamed = [d for d in others if d == "an RPC's task"]
            abandoned += [d for d in others if d != "an RPC's task"] + unnamed[len(rpcs) :]
        shutdown = loop.create_task(loop.shutdown_default_executor())
        loop.run_until_complete(
            asyncio.wait((shutdown, loop.create_task(loop.shutdown_asyncgens())), timeout=_wait_time())
        )
    finally:
        asyncio.set_event_loop(None)
    threads = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    deadline = time.monotonic() + _wait_time()  # e.g. 'def' handlers finishing after their RPC was cancelled
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    threads = [t for t in threads if t.is_alive()]
    abandoned += [f"thread {t.name}" for t in threads]
    if abandoned:
        code = code or 1  # work was cut off: not a clean exit
        logger.warning("exiting with %d still running, abandoned: %s", len(abandoned), "; ".join(abandoned))
    logger.info("shutdown complete, exit code %d", code)
    if abandoned:
        hard_exit(code)
    loop.close()
    return code


def hard_exit(code: int) -> None:
    """Flush what was logged and end the process now, whatever threads are still running."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
