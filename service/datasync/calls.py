"""Calling plugins: time limits, retries with backoff, and the feedback kept in their status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from datasync.api import ChangeEvent, ResyncEvent
from datasync.metrics import Metrics
from datasync.registration import Registration
from datasync.settings import SyncSettings
from datasync.status import PluginState

log = logging.getLogger("datasync")


class PluginCalls:
    def __init__(self, sync: SyncSettings, metrics: Metrics) -> None:
        self._sync = sync
        self._metrics = metrics

    async def hook(self, reg: Registration, name: str, *args: object) -> bool:
        """Call the optional start/stop hook; a failure is recorded, not raised."""
        try:
            async with asyncio.timeout(self._sync.change_timeout_s):
                await getattr(reg.plugin, name)(*args)
            return True
        except Exception as exc:
            reg.status.last_error = f"{name}: {exc!r}"
            self._metrics.plugin_failures.labels(reg.name, name).inc()
            log.error("plugin %s: %s hook failed: %r", reg.name, name, exc)
            return False

    async def resync(self, reg: Registration, event: ResyncEvent) -> None:
        """One resync attempt; on failure schedule the next one (or give up) per the settings."""
        status = reg.status
        status.resync_attempts += 1
        started = time.monotonic()
        try:
            await self._timed(reg, "resync", self._sync.resync_timeout_s, lambda: reg.plugin.resync(event))
        except Exception as exc:
            if reg.apply_status is not None:
                await reg.apply_status.resynced(event, exc)
            status.last_error = f"resync: {exc!r}"
            attempts = status.resync_attempts
            if attempts >= self._sync.resync_max_attempts:
                status.state = PluginState.FAILED
                log.error(
                    "plugin %s: resync of %d keys failed %d times, giving up until the next full resync: %r",
                    *(reg.name, len(event), attempts, exc),
                )
            else:
                delay = min(self._sync.resync_backoff_s * 2 ** (attempts - 1), self._sync.resync_backoff_max_s)
                reg.due = time.monotonic() + delay
                log.warning(
                    "plugin %s: resync of %d keys failed (attempt %d), retrying in %.1fs: %r",
                    *(reg.name, len(event), attempts, delay, exc),
                )
            return
        took = time.monotonic() - started
        if reg.apply_status is not None:
            await reg.apply_status.resynced(event, None)
        reg.diverged = False
        status.state = PluginState.READY
        status.resync_attempts = 0
        status.last_resync_at = time.time()
        status.last_resync_seconds = took
        log.info("plugin %s: resynced %d keys in %.3fs", reg.name, len(event), took)

    async def change(self, reg: Registration, event: ChangeEvent) -> bool:
        """Deliver a CHANGE event, retrying; after the last attempt record the failure. True on success."""
        attempts = self._sync.change_max_attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._timed(reg, "change", self._sync.change_timeout_s, lambda: reg.plugin.change(event))
            except Exception as exc:
                where = ", ".join(f"{c.key}@{c.revision}" for c in event.changes[:10])
                if len(event.changes) > 10:
                    where += f" and {len(event.changes) - 10} more"
                if attempt == attempts:
                    if reg.apply_status is not None:
                        await reg.apply_status.changed(event, exc)
                    reg.status.change_failures += 1
                    reg.status.last_error = f"change: {exc!r}"
                    log.error("plugin %s: change of %s failed %d times, skipped: %r", reg.name, where, attempt, exc)
                    return False
                log.warning("plugin %s: change of %s failed (attempt %d), retrying: %r", reg.name, where, attempt, exc)
                await asyncio.sleep(self._sync.change_backoff_s * 2 ** (attempt - 1))
                continue
            if reg.apply_status is not None:
                await reg.apply_status.changed(event, None)
            reg.status.changes_applied += len(event.changes)
            puts = sum(1 for c in event.changes if c.op == "put")
            if puts:
                self._metrics.changes.labels(reg.name, "put").inc(puts)
            if len(event.changes) > puts:
                self._metrics.changes.labels(reg.name, "delete").inc(len(event.changes) - puts)
            return True
        return False

    async def _timed(self, reg: Registration, kind: str, limit: float, call: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
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
            self._metrics.plugin_seconds.labels(reg.name, kind).observe(time.monotonic() - started)
