"""Overload: shed calls by measured queueing delay, and never start a call that is already late.

grpc.aio accepts every call and queues it as a task on the one event loop; past
capacity that queue grows until every call waits longer than its caller does, and the
server spends its core on calls nobody is waiting for: goodput collapses.  A count of
handlers in flight does not see it (a CPU-bound handler holds the loop, so few are
ever "in flight" while thousands wait in front of them), so the signal here is the
queue itself: how late the loop runs a timer.

Every ``TICK`` a sampler task measures that lateness.  When the smallest of the last
few samples is above ``target`` (a standing queue, not a burst: CoDel's test), the
share of new calls refused rises by ``STEP``; when it is below, the share is cut by a
factor, so admission recovers within a few ticks once the load drops.  A refused call
never reaches middleware, the handler or a thread: it gets UNAVAILABLE at once.
Health and reflection are never refused.
"""

from __future__ import annotations

import asyncio
import collections
import random

TICK = 0.01  # seconds between samples of the loop's lateness
WINDOW = 3  # samples whose smallest must exceed the target: a standing queue, not one slow callback
STEP = 0.05  # added to the refused share per tick over the target
DECAY = 0.7  # the refused share is multiplied by this per tick under the target
MAX_SHARE = 0.98  # some calls always get through: they measure whether the overload is over

SHED_DETAILS = "the server is overloaded: refused before the handler ran, safe to retry on another replica"
LATE_DETAILS = "the call's deadline passed while it waited for the server: its handler was not started"


class LoadShedder:
    """The share of new calls to refuse, kept from the event loop's measured queueing delay.

    ``share`` is read on every call (one attribute read when it is 0); the counters
    are plain ints, read by telemetry when it collects.
    """

    __slots__ = ("_samples", "_task", "delay", "late", "share", "shed", "target")

    def __init__(self, target: float | None) -> None:
        self.target = target  # seconds of queueing delay tolerated; None: never shed
        self.share = 0.0
        self.delay = 0.0  # the loop's lateness at the last sample, in seconds
        self.shed = 0  # calls refused for overload
        self.late = 0  # calls refused because their deadline would pass before the handler
        self._samples: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._task: asyncio.Task[None] | None = None

    def refuse(self) -> bool:
        """Whether to refuse the call at hand (counted when true)."""
        share = self.share
        if share and (share >= 1.0 or random.random() < share):
            self.shed += 1
            return True
        return False

    def start(self) -> None:
        if self.target is not None and self._task is None:
            self._task = asyncio.ensure_future(self._sample())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait((task,), timeout=1.0)

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        target = self.target
        assert target is not None
        while True:
            before = loop.time()
            await asyncio.sleep(TICK)
            self.observe(max(0.0, loop.time() - before - TICK), target)

    def observe(self, delay: float, target: float) -> None:
        """One sample of the loop's lateness: raise or lower the refused share."""
        self.delay = delay
        self._samples.append(delay)
        if len(self._samples) == WINDOW and min(self._samples) > target:
            self.share = min(MAX_SHARE, self.share + STEP)
        elif self.share:
            self.share = self.share * DECAY if self.share > 0.01 else 0.0
