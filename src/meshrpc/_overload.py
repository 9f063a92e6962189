"""Overload: shed calls by measured queueing delay, and never start a call that is already late.

grpc.aio accepts every call and queues it as a task on the one event loop; past
capacity that queue grows until every call waits longer than its caller does, and the
server spends its core on calls nobody is waiting for: goodput collapses.  A count of
handlers in flight does not see it (a CPU-bound handler holds the loop, so few are
ever "in flight" while thousands wait in front of them), so the signal here is the
queue itself: how late the loop runs a timer.

Two signals, because the queue has two places.  Calls accepted by grpc.aio wait as
tasks on the event loop; every ``TICK`` a sampler measures how late the loop runs a
timer, and that is their queueing delay.  Calls not yet accepted wait inside grpc's
core, where Python cannot see them, while the loop looks punctual: there the signal is
each call's deadline.  Callers of a method mostly use one timeout, so the largest time
remaining seen at the start of its calls lately estimates that timeout, and what a call
has less than that is how long it waited.  When even the shortest wait of the last
``INTERVAL`` was longer than ``target`` (a standing queue, CoDel's test again), the server
is saturated, and a call that waited longer than ``target`` is refused: the queue stays
short, so the calls that are served are served soon after they arrive, not just before
their deadline.  The process's CPU is a second, steadier sign: busy at least 95 % of every
tick of the window (off again once clearly idle) also means saturated; but under a CPU
limit (a pod's CFS quota) a saturated process never looks busy for a whole core, so the
waits alone suffice.

Every ``TICK`` a timer callback measures the loop's lateness.  When the smallest of the last
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
import time
from collections.abc import Callable

import grpc

# Seconds between samples of the loop's lateness.  Not 10 ms: a timer firing 100 times a
# second cost a saturated server 2-4 % of its throughput under h2load (0.952-0.986 of raw
# grpc.aio against 0.990-1.019 with shedding off, four alternated runs), for no more Python
# than py-spy puts at 0.4 %; at 25 ms the cost is within the runs' noise (1.012 against 1.019).
TICK = 0.025
WINDOW = 3  # samples whose smallest must exceed the target: a standing queue, not one slow callback
# The refused share's pace in time, not in ticks: up by 5 a second while over the target,
# and cut to 0.7 of itself every 10 ms under it (from 0.98 to nothing in about 130 ms).
STEP = 5.0 * TICK  # added to the refused share per tick over the target
DECAY = 0.7 ** (TICK / 0.01)  # the refused share is multiplied by this per tick under the target
MAX_SHARE = 0.98  # some calls always get through: they measure whether the overload is over
INTERVAL = round(0.1 / TICK)  # ticks (100 ms) over which the shortest wait of a call decides saturation
BUSY = 0.95  # the process's share of a core, every tick of the window, that also means saturated
IDLE = 0.75  # ... and below which, every tick of the window, it no longer does
BUDGET_WINDOW = 5.0  # seconds a method's largest time remaining is remembered for
# A handler that takes less than this costs about what refusing its call does (grpc.aio's
# accept and answer, measured here at 0.15-0.25 ms): shedding its calls saves nothing.
WORTH_SHEDDING = 0.0005
COST_WEIGHT = 0.1  # a handler's weight in its method's average cost (an exponential moving average)

SHED_DETAILS = "the server is overloaded: refused before the handler ran, safe to retry on another replica"
LATE_DETAILS = "the call's deadline passed while it waited for the server: its handler was not started"
Refusal = tuple[grpc.StatusCode, str]
SHED: Refusal = (grpc.StatusCode.UNAVAILABLE, SHED_DETAILS)
LATE: Refusal = (grpc.StatusCode.DEADLINE_EXCEEDED, LATE_DETAILS)


class LoadShedder:
    """The share of new calls to refuse, kept from the event loop's measured queueing delay.

    ``share`` is read on every call (one attribute read when it is 0); the counters
    are plain ints, read by telemetry when it collects.
    """

    __slots__ = (
        "_busy",
        "_cpu_saturated",
        "_last_cpu",
        "_last_tick",
        "_loop",
        "_rotated",
        "_samples",
        "_ticks",
        "_timer",
        "_waited_too_long",
        "budgets",
        "delay",
        "late",
        "min_remaining",
        "min_wait",
        "saturated",
        "share",
        "shed",
        "target",
    )

    def __init__(self, target: float | None, min_remaining: float = -1.0) -> None:
        self.target = target  # seconds of queueing delay tolerated; None: never shed
        self.min_remaining = min_remaining  # a call with no more time left is not started (-1: every call is)
        self.share = 0.0
        self.delay = 0.0  # the loop's lateness at the last sample, in seconds
        self.shed = 0  # calls refused for overload
        self.late = 0  # calls refused because their deadline would pass before the handler
        self._samples: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.min_wait = float("inf")  # the shortest wait of a call with a deadline since the last interval
        self._busy: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._cpu_saturated = False
        self._timer: asyncio.TimerHandle | None = None
        # The sampler's state between ticks, set by start(): the loop's time and the process's
        # CPU time at the last tick, the last budget rotation, ticks so far, the last
        # interval's verdict on the waits.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_tick = self._last_cpu = self._rotated = 0.0
        self._ticks = 0
        self._waited_too_long = False
        self.saturated = False  # every call of the last interval waited longer than the target
        self.budgets: list[Budget] = []  # one per method, rotated by the sampler

    def admission(self) -> tuple[Callable[[float | None], Refusal | None], Budget]:
        """One method's deadline check and its :class:`Budget`.

        The handler wrapper asks ``admit(remaining)`` (``remaining``: the seconds the call
        has left, None without a deadline) only when ``share`` is set or the call has a
        deadline, the only cases that can refuse it: None for a call to serve, else the
        refusal to answer it with.  While the server is saturated the wrapper adds what
        each handler took to the budget's ``cost`` (see `Budget`)."""
        budget = Budget()
        self.budgets.append(budget)
        target = self.target if self.target is not None else float("inf")
        min_remaining = self.min_remaining

        def admit(remaining: float | None) -> Refusal | None:
            if self.share and self.refuse():  # the event loop's own queue is too long
                return SHED
            if remaining is None:
                return None
            if remaining <= min_remaining:
                self.late += 1
                return LATE
            if remaining > budget.estimate:
                budget.estimate = budget.seen = remaining
                self.min_wait = 0.0
                return None
            if remaining > budget.seen:
                budget.seen = remaining
            wait = budget.estimate - remaining
            if wait < self.min_wait:
                self.min_wait = wait
            if self.saturated and wait > target and budget.cost >= WORTH_SHEDDING:
                self.shed += 1  # it waited longer than tolerated, in grpc's queue, while saturated
                return SHED
            return None

        return admit, budget

    def refuse(self) -> bool:
        """Whether to refuse the call at hand (counted when true)."""
        share = self.share
        if share and (share >= 1.0 or random.random() < share):
            self.shed += 1
            return True
        return False

    def start(self) -> None:
        if self.target is not None and self._timer is None:
            loop = self._loop = asyncio.get_running_loop()
            self._last_tick = self._rotated = loop.time()
            self._last_cpu = time.process_time()
            self._ticks, self._waited_too_long = 0, False
            self._timer = loop.call_at(self._last_tick + TICK, self._tick)

    async def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _tick(self) -> None:
        """One sample, TICK after the last: a timer callback (no task, future or sleep per
        tick), reading the process's CPU once per tick."""
        target, loop = self.target, self._loop
        assert target is not None and loop is not None
        before, after = self._last_tick, loop.time()
        # The process's CPU, not only the loop thread's: 'def' handlers burn theirs in the
        # pool's threads, and the GIL makes one core the limit for both.  One read of each
        # clock per tick: this tick's readings are the next one's start.
        cpu_now = time.process_time()
        self._busy.append((cpu_now - self._last_cpu) / max(after - before, 1e-6))
        self._last_tick, self._last_cpu = after, cpu_now
        if len(self._busy) == WINDOW:
            if min(self._busy) >= BUSY:
                self._cpu_saturated = True
            elif max(self._busy) < IDLE:
                self._cpu_saturated = False
        self._ticks += 1
        if self._ticks % INTERVAL == 0:
            # Even the shortest wait of the interval was too long; not when no call with
            # a deadline came (the loop's own queue covers those).
            self._waited_too_long = target < self.min_wait < float("inf")
            self.min_wait = float("inf")
        self.saturated = self._cpu_saturated or self._waited_too_long
        self.observe(max(0.0, after - before - TICK), target)
        if after - self._rotated >= BUDGET_WINDOW and not self.saturated:
            # Not while saturated: every call then waits, and the estimate would shrink to match.
            self._rotated = after
            for budget in self.budgets:
                budget.rotate()
        self._timer = loop.call_at(after + TICK, self._tick)

    def observe(self, delay: float, target: float) -> None:
        """One sample of the loop's lateness: raise or lower the refused share."""
        self.delay = delay
        self._samples.append(delay)
        if len(self._samples) == WINDOW and min(self._samples) > target:
            self.share = min(MAX_SHARE, self.share + STEP)
        elif self.share:
            self.share = self.share * DECAY if self.share > 0.01 else 0.0


class Budget:
    """One method's view of its calls under load.

    The largest time remaining seen at the start of its calls, lately, estimates the
    timeout its callers use, so ``estimate - remaining`` is how long a call waited before
    its handler could start.  And ``cost``, what its handler takes, measured only while the
    server is saturated: the wrapper adds each handler's seconds as
    ``cost += (seconds - cost) * COST_WEIGHT`` (inline: a call of a method here would cost
    every call of a saturated server).  Refusing a call costs about what accepting it
    does, so refusing calls of a method whose handler costs less than `WORTH_SHEDDING`
    shortens no queue; it would only turn calls away.  Such a method's calls are never
    shed for their wait.
    """

    __slots__ = ("cost", "estimate", "seen")

    def __init__(self) -> None:
        self.seen = 0.0  # the largest in this window
        self.estimate = 0.0  # the largest in this window and the last
        self.cost = WORTH_SHEDDING  # seconds a handler takes, averaged (assumed worth it until measured)

    def rotate(self) -> None:
        self.estimate, self.seen = self.seen, 0.0
