"""Per-plugin delivery: each plugin's bounded queue of CHANGE batches and the task that hands them over.

Each plugin gets its own queue and task, so a plugin that is slow or retrying
holds back only itself and the plugins declared ``after`` it; a plugin waits
until the plugins it comes after have handled (or skipped) every earlier batch.
A plugin that fell behind gets its queued batches merged into fewer, larger
CHANGE events (up to ``max_batch`` changes), so it catches up in fewer calls.
Queues are bounded in records: while one is full the engine does not fetch,
so a slow plugin slows fetching down instead of filling memory.

Resyncs stay in the engine task. ``pause()`` drops a plugin's queued batches
(the resync covers them) and waits for its call in flight, so a plugin never
handles a resync and a change at the same time.

A delivery task that dies (a bug: plugin failures are caught) is logged at once
with its exception; its plugin's queue is dropped, so the engine never waits
for it, the plugin is resynced (its view misses those changes) and gets a new
delivery task.

Stopping cancels the delivery tasks and gives them ``CANCEL_GRACE_S`` to end:
the engine has already given the calls in flight ``shutdown_timeout_s``. A task
whose plugin swallows the cancellation is logged and abandoned; it ends once
that call returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

from datasync.api import Change, ChangeEvent
from datasync.calls import PluginCalls
from datasync.registration import Registration
from datasync.status import PluginState

log = logging.getLogger("datasync")

EVERYTHING = float("inf")
CANCEL_GRACE_S = 1.0  # how long a cancelled delivery task gets to end (its plugin's cleanup)


class _Queue:
    __slots__ = ("reg", "after", "items", "records", "current", "task")

    def __init__(self, reg: Registration, after: Sequence[_Queue]) -> None:
        self.reg = reg
        self.after = after
        self.items: deque[tuple[int, list[Change]]] = deque()  # (batch sequence number, changes)
        self.records = 0  # changes queued or in flight
        self.current: int | None = None  # sequence number of the batch in flight
        self.task: asyncio.Task[None] | None = None

    def done_through(self) -> float:
        """Every batch up to this sequence number has been handled (or skipped)."""
        pending = [seq for seq in (self.current, self.items[0][0] if self.items else None) if seq is not None]
        return min(pending) - 1 if pending else EVERYTHING


class Deliveries:
    """The queues and delivery tasks of every registered plugin."""

    def __init__(
        self,
        calls: PluginCalls,
        max_records: int,
        max_batch: int,
        on_step: Callable[[], Awaitable[None]],
        on_skipped: Callable[[Registration], None],
    ) -> None:
        self._calls = calls
        self._max_records = max_records
        self._max_batch = max_batch
        self._on_step = on_step  # after every delivered batch (progress, waiters)
        self._on_skipped = on_skipped  # a batch failed every attempt and was skipped
        self._queues: dict[Registration, _Queue] = {}
        self._changed = asyncio.Event()  # replaced after each notification: see _notify
        self._halted = False
        self._held = False  # a rebalance: nothing is handed over until resume()

    def add(self, reg: Registration, after: Iterable[Registration] = ()) -> None:
        """Give ``reg`` a queue; its batches wait for those of ``after`` (registered earlier)."""
        self._queues[reg] = _Queue(reg, [self._queues[a] for a in after])
        self._start(self._queues[reg])

    def start(self) -> None:
        self._halted = False
        for queue in self._queues.values():
            self._start(queue)

    def _start(self, queue: _Queue) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # registered before the loop runs: started by start()
        if queue.task is None or queue.task.done():
            queue.task = task = asyncio.create_task(self._deliver(queue), name=f"datasync-deliver-{queue.reg.name}")
            task.add_done_callback(lambda _: self._ended(queue, task))

    def _ended(self, queue: _Queue, task: asyncio.Task[None]) -> None:
        """A delivery task ended. If it died, log why, drop the plugin's queue (the engine must not wait
        for it) and have the plugin resynced; unless stopped or removed, start it again."""
        if task.cancelled():
            return  # stopped, or the plugin removed
        if queue.task is task:
            queue.task = None
        reg, exc = queue.reg, task.exception()
        if exc is not None:
            log.error(
                "plugin %s: its delivery task failed: %r; its queued changes are dropped and it is resynced",
                *(reg.name, exc),
                exc_info=exc,
                extra={"plugin": reg.name},
            )
        if self._queues.get(reg) is not queue:
            return  # removed while it was handling a batch (a plugin closing itself)
        if exc is not None:
            reg.status.last_error = f"delivery: {exc!r}"
            reg.diverged = True
            self.drop(reg)
            if reg.status.state is PluginState.READY:
                reg.status.state = PluginState.RESYNCING
                reg.due = time.monotonic()
                reg.status.next_attempt_at = time.time()
        if not self._halted:
            self._start(queue)

    def queued(self, reg: Registration) -> int:
        """Changes queued or in flight for ``reg``."""
        queue = self._queues.get(reg)
        return 0 if queue is None else queue.records

    def in_task(self, reg: Registration) -> bool:
        """Whether the current task is ``reg``'s delivery task (a plugin calling from its handler)."""
        queue = self._queues.get(reg)
        return queue is not None and queue.task is asyncio.current_task()

    def _notify(self) -> None:
        """Wake every waiter; they re-check their condition (one event loop: no lock needed)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def put(self, seq: int, batches: dict[Registration, list[Change]]) -> None:
        """Queue batch ``seq`` for each plugin, then wait while a ready plugin's queue is over its bound."""
        for reg, changes in batches.items():
            queue = self._queues.get(reg)
            if queue is not None and changes:
                queue.items.append((seq, changes))
                queue.records += len(changes)
        self._notify()
        await self._wait_for(self._below_bound)

    def _below_bound(self) -> bool:
        limit = self._max_records
        ready = PluginState.READY
        return self._halted or all(q.records <= limit or q.reg.status.state is not ready for q in self._queues.values())

    async def pause(self, reg: Registration) -> bool:
        """Drop ``reg``'s queued batches and wait for its call in flight. True if any were dropped."""
        queue = self._queues.get(reg)
        if queue is None:
            return False
        dropped = self.drop(reg)
        await self._wait_for(lambda: queue.current is None)
        return dropped

    def drop(self, reg: Registration, keep: Callable[[Change], bool] | None = None) -> bool:
        """Drop ``reg``'s queued changes (those ``keep`` rejects, or all); True if any were dropped."""
        queue = self._queues.get(reg)
        if queue is None:
            return False
        before = queue.records
        kept: deque[tuple[int, list[Change]]] = deque()
        for seq, changes in queue.items:
            left = [] if keep is None else [c for c in changes if keep(c)]
            queue.records -= len(changes) - len(left)
            if left:
                kept.append((seq, left))
        queue.items = kept
        self._notify()
        return queue.records < before

    async def remove(self, reg: Registration) -> None:
        """Stop delivering to ``reg``: drop its queue, let its call in flight end, end its task."""
        queue = self._queues.get(reg)
        if queue is None:
            return
        if queue.task is not asyncio.current_task():  # a plugin closing itself ends its own task afterwards
            await self.pause(reg)
            await _cancel([queue])
        self._queues.pop(reg, None)
        for other in self._queues.values():
            other.after = [a for a in other.after if a is not queue]
        self._notify()

    def halt(self) -> None:
        """No further plugin calls: drop every queue (the calls in flight may still end)."""
        self._halted = True
        for reg in self._queues:
            self.drop(reg)

    async def hold(self, drain_s: float) -> None:
        """Before a revocation completes: hand over what is queued for ready plugins (at most ``drain_s``),
        then deliver nothing more until ``resume()``; returns once no call is in flight."""
        if self._held:  # held already (the engine loops while the rebalance runs): nothing drains now
            await self.wait_idle()
            return
        try:
            async with asyncio.timeout(drain_s):
                await self._wait_for(self._drained)
        except TimeoutError:
            log.warning("rebalance: plugin queues not drained after %.1fs; the rest waits", drain_s)
        self._held = True
        await self.wait_idle()

    def _drained(self) -> bool:
        ready = PluginState.READY
        return all((not q.items or q.reg.status.state is not ready) and q.current is None
                   for q in self._queues.values())  # fmt: skip

    def resume(self) -> None:
        if self._held:
            self._held = False
            self._notify()

    def calls_in_flight(self) -> list[Registration]:
        return [q.reg for q in self._queues.values() if q.current is not None]

    async def wait_idle(self) -> None:
        await self._wait_for(lambda: all(q.current is None for q in self._queues.values()))

    async def stop(self) -> None:
        """Cancel every delivery task (after ``halt()`` and a bounded ``wait_idle()``), bounded in time."""
        await _cancel(list(self._queues.values()))

    async def _deliver(self, queue: _Queue) -> None:
        reg = queue.reg
        while True:
            await self._wait_for(lambda: self._due(queue) or self._queues.get(reg) is not queue)
            if self._queues.get(reg) is not queue:
                return  # removed while it was handling a batch (a plugin closing itself)
            seq, changes = self._take(queue)
            queue.current = seq
            try:
                ok = await self._calls.change(reg, ChangeEvent(changes))
            finally:
                queue.current = None
                queue.records -= len(changes)
                self._notify()
            if _cancelled_meanwhile():  # the plugin swallowed the cancellation: this task was abandoned
                return
            if not ok:
                self._on_skipped(reg)
                if reg.status.state is not PluginState.READY:  # it will be resynced: the queue is stale
                    self.drop(reg)
            await self._on_step()

    def _due(self, queue: _Queue) -> bool:
        if self._halted or self._held or not queue.items or queue.reg.status.state is not PluginState.READY:
            return False
        return self._after_done(queue, queue.items[0][0])

    @staticmethod
    def _after_done(queue: _Queue, seq: int) -> bool:
        return all(a.done_through() >= seq for a in queue.after)

    def _take(self, queue: _Queue) -> tuple[int, list[Change]]:
        """The first queued batch, merged with the due batches after it, up to ``max_batch`` changes."""
        seq, changes = queue.items.popleft()
        items = queue.items
        while items and len(changes) + len(items[0][1]) <= self._max_batch and self._after_done(queue, items[0][0]):
            changes.extend(items.popleft()[1])  # each queued list is this queue's own
        return seq, changes


async def _cancel(queues: Sequence[_Queue]) -> None:
    """Cancel the queues' delivery tasks and wait at most ``CANCEL_GRACE_S`` for them to end. A task
    still running then (its plugin swallowed the cancellation) is logged and abandoned: it stays the
    queue's task, so no second one calls the plugin while that call runs, and it ends when the call
    returns."""
    running = [q for q in queues if q.task is not None and not q.task.done()]
    for queue in queues:
        if queue not in running:
            queue.task = None
    if not running:
        return
    for queue in running:
        assert queue.task is not None
        queue.task.cancel()
    _, pending = await asyncio.wait([q.task for q in running if q.task is not None], timeout=CANCEL_GRACE_S)
    for queue in running:
        if queue.task in pending:
            log.error(
                "plugin %s: its change call ignores cancellation; abandoned after %.1fs",
                *(queue.reg.name, CANCEL_GRACE_S),
                extra={"plugin": queue.reg.name},
            )
        else:
            queue.task = None


def _cancelled_meanwhile() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
