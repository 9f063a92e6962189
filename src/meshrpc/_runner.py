"""Run a server in a process meshrpc owns, and make sure that process ends.

``asyncio.run`` waits without limit for leftover tasks that ignore cancellation and
for the default executor's threads (``asyncio.to_thread``), and the interpreter
then joins those threads again at exit: one stuck readiness check or lifespan
call kept a drained server alive for ever.  Here every wait is bounded; what is
still running after it is named in the log and abandoned with ``os._exit``.
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
_owned = False


def owns_process() -> bool:
    """True inside :func:`run`: the server may end the process (never when embedded in tests)."""
    return _owned


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` in a new event loop and return its exit code, or exit the process."""
    global _owned
    _owned = True
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    abandoned: list[str] = []
    try:
        code = loop.run_until_complete(main)
        leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=EXIT_WAIT))
        abandoned += [f"task {task.get_coro()!r}" for task in leftovers if not task.done()]
        shutdown = loop.create_task(loop.shutdown_default_executor())
        loop.run_until_complete(
            asyncio.wait((shutdown, loop.create_task(loop.shutdown_asyncgens())), timeout=EXIT_WAIT)
        )
    finally:
        asyncio.set_event_loop(None)
    threads = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    deadline = time.monotonic() + EXIT_WAIT  # e.g. 'def' handlers finishing after their RPC was cancelled
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    threads = [t for t in threads if t.is_alive()]
    abandoned += [f"thread {t.name}" for t in threads]
    if abandoned:
        logger.warning("exiting with %d still running, abandoned: %s", len(abandoned), "; ".join(abandoned))
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
