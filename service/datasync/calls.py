"""Calling plugins: time limits, retries with backoff, and the feedback kept in their status.

A plugin whose start hook or resync fails is retried with capped backoff for
as long as the service runs; after ``resync_max_attempts`` failures in a row it
counts as ``failed`` (visible, and optionally fatal to ``/healthz``) until a
retry succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from datasync.api import ChangeEvent, PluginContext, ResyncEvent
from datasync.metrics import Metrics
from datasync.publish import calling
from datasync.registration import Registration
from datasync.settings import SyncSettings
from datasync.status import PluginState

log = logging.getLogger("datasync")

PROGRESS_EVERY_S = 10.0  # how often a long plugin call logs that it is still running


class PluginCalls:
    def __init__(
        self,
        sync: SyncSettings,
        metrics: Metrics,
        room: Callable[[str, int], Awaitable[None]],
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self._sync = sync
        self._metrics = metrics
        self._room = room  # Publishing.room: wait until a plugin has at most so many put_nowait sends pending
        self._on_progress = on_progress  # a long call that is still within its limit is progress
        self.running: dict[str, str] = {}  # plugin name -> kind of the call in flight

    async def hook(self, reg: Registration, name: str, *args: object) -> bool:
        """Call the optional start/stop hook; a failure is recorded, not raised."""
        try:
            await self._timed(reg, name, self._sync.change_timeout_s, lambda: getattr(reg.plugin, name)(*args))
            return True
        except Exception as exc:
            reg.status.last_error = f"{name}: {exc!r}"
            log.error("plugin %s: %s hook failed: %r", reg.name, name, exc, extra={"plugin": reg.name})
            return False

    async def start(self, reg: Registration, ctx: PluginContext) -> bool:
        """The start hook, before the first resync; a failure is retried like a failed resync."""
        if await self.hook(reg, "start", ctx):
            return True
        reg.status.resync_attempts += 1
        self._retry_later(reg, "start hook", reg.status.last_error or "")
        return False

    async def resync(self, reg: Registration, event: ResyncEvent) -> None:
        """One resync attempt; on failure schedule the next one."""
        reg.status.resync_attempts += 1
        started = time.monotonic()
        try:
            await self._published(reg, "resync", self._sync.resync_timeout_s, lambda: reg.plugin.resync(event))
        except Exception as exc:
            if reg.apply_status is not None:
                await reg.apply_status.resynced(event, exc)
            reg.status.last_error = f"resync: {exc!r}"
            self._retry_later(reg, f"resync of {len(event)} keys", repr(exc))
            return
        took = time.monotonic() - started
        if reg.apply_status is not None:
            await reg.apply_status.resynced(event, None)
        reg.diverged = False
        self.succeeded(reg)
        reg.status.last_resync_at = time.time()
        reg.status.last_resync_seconds = took
        log.info("plugin %s: resynced %d keys in %.3fs", reg.name, len(event), took, extra={"plugin": reg.name})

    def succeeded(self, reg: Registration) -> None:
        """The plugin is in sync again: it gets changes; failures are forgotten."""
        status = reg.status
        status.state = PluginState.READY
        status.resync_attempts = 0
        status.last_error = None
        status.failed_since = None
        status.next_attempt_at = None

    def _retry_later(self, reg: Registration, what: str, error: str) -> None:
        status, sync = reg.status, self._sync
        attempts = status.resync_attempts
        delay = min(sync.resync_backoff_s * 2 ** min(attempts - 1, 30), sync.resync_backoff_max_s)
        reg.due = time.monotonic() + delay
        status.next_attempt_at = time.time() + delay
        if attempts >= sync.resync_max_attempts:
            if status.state is not PluginState.FAILED:
                status.state = PluginState.FAILED
                status.failed_since = time.time()
            log.error(
                "plugin %s: %s failed %d times in a row, retrying in %.1fs: %s",
                *(reg.name, what, attempts, delay, error),
                extra={"plugin": reg.name},
            )
        else:
            status.state = PluginState.RESYNCING
            log.warning(
                "plugin %s: %s failed (attempt %d), retrying in %.1fs: %s",
                *(reg.name, what, attempts, delay, error),
                extra={"plugin": reg.name},
            )

    async def change(self, reg: Registration, event: ChangeEvent) -> bool:
        """Deliver a CHANGE event, retrying; after the last attempt record the failure. True on success."""
        attempts = self._sync.change_max_attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._published(reg, "change", self._sync.change_timeout_s, lambda: reg.plugin.change(event))
            except Exception as exc:
                where = ", ".join(f"{c.key}@{c.revision}" for c in event.changes[:10])
                if len(event.changes) > 10:
                    where += f" and {len(event.changes) - 10} more"
                if attempt == attempts:
                    if reg.apply_status is not None:
                        await reg.apply_status.changed(event, exc)
                    reg.status.change_failures += 1
                    reg.status.last_error = f"change: {exc!r}"
                    log.error(
                        "plugin %s: change of %s failed %d times, skipped: %r",
                        *(reg.name, where, attempt, exc),
                        extra={"plugin": reg.name},
                    )
                    return False
                log.warning(
                    "plugin %s: change of %s failed (attempt %d), retrying: %r",
                    *(reg.name, where, attempt, exc),
                    extra={"plugin": reg.name},
                )
                await asyncio.sleep(self._sync.change_backoff_s * 2 ** (attempt - 1))
                continue
            if reg.apply_status is not None:
                await reg.apply_status.changed(event, None)
            reg.status.changes_applied += len(event.changes)
            reg.status.last_error = None
            for op, n in Counter(c.op for c in event.changes).items():
                self._metrics.changes.labels(reg.name, op).inc(n)
            return True
        return False

    async def _published(self, reg: Registration, kind: str, limit: float, call: Callable[[], Awaitable[None]]) -> None:
        """A RESYNC or CHANGE call; then wait until the broker acknowledged (or gave up on) every
        put_nowait send the plugin has pending, so that its next call may start MAX_IN_FLIGHT."""
        try:
            await self._timed(reg, kind, limit, call)
        except Exception:
            await self._room(reg.name, 0)
            raise
        await self._room(reg.name, 0)

    async def _timed(self, reg: Registration, kind: str, limit: float, call: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        self.running[reg.name] = kind
        ticker = asyncio.create_task(self._still_running(reg, kind, started), name=f"datasync-ticker-{reg.name}")
        try:
            async with asyncio.timeout(limit):
                with calling(reg.name):  # its put_nowait sends count against its own limit
                    await call()
        except TimeoutError:
            self._metrics.plugin_failures.labels(reg.name, kind).inc()
            raise TimeoutError(f"{kind} took longer than {limit}s") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the engine is being stopped
            self._metrics.plugin_failures.labels(reg.name, kind).inc()
            raise RuntimeError(f"{kind} raised CancelledError") from None
        except Exception:
            self._metrics.plugin_failures.labels(reg.name, kind).inc()
            raise
        finally:
            ticker.cancel()
            self.running.pop(reg.name, None)
            self._metrics.plugin_seconds.labels(reg.name, kind).observe(time.monotonic() - started)

    async def _still_running(self, reg: Registration, kind: str, started: float) -> None:
        """While a call runs within its limit, log it now and then, and count it as progress."""
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            self._on_progress()
            log.info(
                "plugin %s: %s still running after %.0fs",
                *(reg.name, kind, time.monotonic() - started),
                extra={"plugin": reg.name},
            )
