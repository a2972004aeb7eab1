"""Broker reachability: a cheap metadata request on a client of its own."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from datasync.settings import KafkaSettings

log = logging.getLogger(__name__)


class BrokerProbe:
    """Answers "does the cluster respond right now?" without touching the consumer."""

    def __init__(self, kafka: KafkaSettings, timeout_s: float) -> None:
        self._kafka = kafka
        self._timeout_s = timeout_s
        self._admin: AIOKafkaAdminClient | None = None

    async def __aenter__(self) -> BrokerProbe:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self._close()

    async def reachable(self) -> bool:
        try:
            # aiokafka times its requests out itself, within ours: cancelled from outside during its
            # bootstrap, aiokafka 0.14 leaves the bootstrap connection open ("Unclosed
            # AIOKafkaConnection" when it is garbage collected); its own time-out closes it. Its
            # bootstrap tries each server in turn (connect, version lookup, metadata, each timed),
            # then we ask once more (which may connect to another broker): ours is a backstop.
            hosts = len(self._kafka.bootstrap_servers.split(","))
            async with asyncio.timeout((3 * hosts + 3) * self._timeout_s):
                if self._admin is None:
                    options = {**self._kafka.client_options(), "request_timeout_ms": int(self._timeout_s * 1000)}
                    self._admin = AIOKafkaAdminClient(**options)
                    await self._admin.start()  # if this fails, _close() below closes it
                await self._admin.describe_cluster()
            return True
        except Exception as exc:  # Kafka errors, refused connections, time-outs: all mean "not now"
            expected = isinstance(exc, KafkaError | OSError | TimeoutError)
            log.log(logging.DEBUG if expected else logging.WARNING, "broker probe failed: %r", exc)
            await self._close()  # start afresh next time: cached connections may be dead
            return False

    async def _close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except Exception as exc:  # closing a client of a dead broker may fail in odd ways
                log.debug("closing broker probe: %r", exc)
