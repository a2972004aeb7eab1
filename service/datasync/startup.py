"""Starting before Kafka is there: retry the connection with capped backoff instead of crash-looping.

``datasync run`` serves HTTP from the first moment; while it waits, ``Startup``
tells ``/healthz`` (200: the process is fine) and ``/readyz`` (503 and why).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError

from datasync.errors import TopicError
from datasync.settings import KafkaSettings

log = logging.getLogger("datasync")

# What "the broker is not there (yet)" looks like: worth another attempt.
UNREACHABLE = (KafkaError, OSError, TimeoutError, TopicError)
FIRST_DELAY_S = 1.0


@dataclass
class Startup:
    """The service's life before its engine runs (read by the HTTP handlers)."""

    waiting: str | None = None  # "waiting for broker at X: reason" while connecting fails
    starting: bool = True  # False once the engine runs or the service gives up or stops


class GaveUp(Exception):
    """The broker stayed unreachable longer than ``connect_give_up_s``."""


def reason(exc: BaseException) -> str:
    """A one-line account of a connection failure (without aiokafka's address tuples)."""
    name = type(exc).__name__
    text = (str(exc) or name).split(" from [")[0].strip()
    return text if text.startswith(name) else f"{name}: {text}"


async def connect_with_retry(
    connect: Callable[[], Coroutine[Any, Any, None]], kafka: KafkaSettings, startup: Startup, stop: asyncio.Event
) -> bool:
    """Call ``connect`` until it succeeds (True) or ``stop`` is set (False); raise GaveUp when over time.

    A stop request cancels an attempt in flight, so SIGTERM during start-up is prompt.
    """
    started = time.monotonic()
    delay = FIRST_DELAY_S
    attempt = 0
    while True:
        attempt += 1
        attempt_task = asyncio.create_task(connect(), name="datasync-connect")
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([attempt_task, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not attempt_task.done():
            attempt_task.cancel()
            await asyncio.wait([attempt_task])
            return False
        error = attempt_task.exception()
        if error is None:
            startup.waiting = None
            return True
        if not isinstance(error, UNREACHABLE):
            raise error
        waited = time.monotonic() - started
        startup.waiting = f"waiting for broker at {kafka.bootstrap_servers}: {reason(error)}"
        state = "not ready" if isinstance(error, TopicError) else "unreachable"  # reached, but topics are missing
        wait = delay
        if kafka.connect_give_up_s is not None:
            if waited >= kafka.connect_give_up_s:
                raise GaveUp(f"broker at {kafka.bootstrap_servers} {state} for {waited:.0f}s: {reason(error)}")
            wait = min(delay, kafka.connect_give_up_s - waited)  # the last attempt is at the limit
        log.warning(
            "broker at %s %s (attempt %d): %s; retrying in %gs",
            *(kafka.bootstrap_servers, state, attempt, reason(error), round(wait, 1)),
        )
        try:
            await asyncio.wait_for(stop.wait(), timeout=wait)
            return False
        except TimeoutError:
            pass
        delay = min(delay * 2, kafka.connect_backoff_max_s)
