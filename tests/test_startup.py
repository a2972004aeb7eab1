"""Connecting at start, without a broker: how long ``run`` keeps trying."""

from __future__ import annotations

import asyncio
import time

import pytest

from datasync import startup
from datasync.errors import TopicError
from datasync.settings import KafkaSettings
from datasync.startup import GaveUp, Startup, connect_with_retry


async def test_attempts_go_on_until_the_give_up_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "FIRST_DELAY_S", 0.2)
    attempts: list[float] = []

    async def refused() -> None:
        attempts.append(time.monotonic() - started)
        raise ConnectionRefusedError("refused")

    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", connect_give_up_s=0.9)
    started = time.monotonic()
    with pytest.raises(GaveUp, match=r"^broker at 127.0.0.1:1 unreachable for 1s: ConnectionRefusedError: refused$"):
        await connect_with_retry(refused, kafka, Startup(), asyncio.Event())
    # At 0, 0.2 and 0.6 s; the next wait, 0.8 s, is cut short to end at the limit, where the last attempt is.
    assert len(attempts) == 4, attempts
    assert attempts[-1] == pytest.approx(0.9, abs=0.05)


async def test_missing_topics_are_not_called_an_unreachable_broker() -> None:
    """A broker that answers but lacks topics (creation disabled) is waited for as "not ready"."""

    async def missing() -> None:
        raise TopicError("topic(s) t do not exist (creation is disabled)")

    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", connect_give_up_s=0)
    with pytest.raises(GaveUp, match=r"^broker at 127.0.0.1:1 not ready for 0s: TopicError: topic\(s\) t do not"):
        await connect_with_retry(missing, kafka, Startup(), asyncio.Event())
