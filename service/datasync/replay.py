"""Replaying history: the changes a stretch of a topic made, with the engine's folding rules.

For plugins that must not miss what happened while they were down (the
changefeed): the topic is read from the beginning; records before ``start``
only rebuild the state silently, records from ``start`` up to ``end`` come out
as changes with correct previous values.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

from datasync.api import Change
from datasync.bindings import TopicSpec
from datasync.codecs import Codec
from datasync.ingest import Ingest
from datasync.metrics import Metrics
from datasync.reader import TableReader
from datasync.settings import KafkaSettings, SyncSettings
from datasync.table import StateTable

Positions = Mapping[tuple[str, int], int]


class Replayer:
    def __init__(
        self, kafka: KafkaSettings, sync: SyncSettings, topics: Mapping[str, TopicSpec], codecs: Mapping[str, Codec]
    ) -> None:
        self._kafka = kafka
        self._sync = sync
        self._topics = topics
        self._codecs = codecs

    async def changes(self, start: Positions, end: Positions) -> AsyncGenerator[list[Change], None]:
        """Batches of the changes made by records at ``start <= offset < end``, per partition in order."""
        names = sorted({topic for topic, _ in end})
        partitions: dict[str, int] = {}
        for topic, partition in end:
            partitions[topic] = max(partitions.get(topic, 0), partition + 1)
        # A private Metrics: replays must not count the same records twice in the engine's metrics.
        ingest = Ingest(
            {n: self._topics[n] for n in names}, dict(self._codecs), Metrics(), self._sync.emit_identical_puts
        )
        tables = {name: StateTable(name) for name in names}
        reader = TableReader(self._kafka, self._sync.fetch_max_records)
        await reader.start(partitions)
        try:
            await reader.rewind()
            ends = {tp: end[(tp.topic, tp.partition)] for tp in reader.partitions}
            while await reader.behind(ends):
                batch = await reader.fetch(timeout_ms=200)
                await ingest.prepare(batch)
                out: list[Change] = []
                for tp, records in batch.items():
                    first, last = start.get((tp.topic, tp.partition), 0), ends[tp]
                    for record in records:
                        if record.offset >= last:
                            break
                        change = ingest.fold(tables[tp.topic], record)
                        if change is not None and record.offset >= first:
                            out.append(change)
                ingest.take_rejected()
                if out:
                    yield out
        finally:
            await reader.stop()
