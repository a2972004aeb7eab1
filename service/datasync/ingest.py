"""Folding records into state tables: validate, decode, update, and say what changed.

Keys are interned from the first rebuild on: after a rebuild the table and the
plugins (which keep keys in their own state) share one string per key instead
of holding two. The first build does not intern (nobody holds keys yet, and it
is the load everyone waits for); the first rebuild interns the keys the plugins
got from it before reading anew. Loading a snapshot follows the same rule
(``Ingest.interning``).

A record that cannot be applied (no key, a key that is not UTF-8, an oversized
or undecodable value) never reaches the table, so the key keeps its last good
value. It is counted, logged with topic/partition/offset and key, and kept in
``rejected`` for the dead-letter topic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from sys import intern
from typing import TypeAlias

from aiokafka import ConsumerRecord, TopicPartition

from datasync import avrowalk
from datasync.api import Change
from datasync.bindings import TopicSpec
from datasync.codecs import AvroCodec, Codec
from datasync.confluent import RegistryCodec, prepare_decode
from datasync.metrics import Metrics
from datasync.table import StateTable, pack, same_value

log = logging.getLogger("datasync.ingest")

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


@dataclass(frozen=True)
class Rejected:
    topic: str
    record: Record
    reason: str
    detail: str


class Ingest:
    def __init__(
        self, topics: dict[str, TopicSpec], codecs: dict[str, Codec], metrics: Metrics, emit_identical_puts: bool
    ) -> None:
        self._codecs = codecs
        self._limits = {name: spec.max_value_bytes for name, spec in topics.items()}
        self._metrics = metrics
        self._emit_identical = emit_identical_puts
        self._interning = False
        self.rejected: list[Rejected] = []

    async def prepare(
        self, batch: Mapping[TopicPartition, list[Record]], tables: Mapping[str, StateTable] | None = None
    ) -> None:
        """Before folding: let codecs load what decoding needs (registry schemas), waiting if it is away.

        With ``tables`` (changes are made), also the schemas of the values the records replace: a
        change carries the previous value, whose schema a bounded cache may have dropped since.
        """
        for tp, records in batch.items():
            codec = self._codecs[tp.topic]
            await prepare_decode(codec, (record.value for record in records))
            if tables is not None and isinstance(codec, RegistryCodec) and codec.client.evictions:
                data = tables[tp.topic].data
                await codec.prepare_decode(data.get(r.key.decode(errors="replace")) for r in records if r.key)

    @property
    def interning(self) -> bool:
        """Whether table keys are interned now: from the first rebuild on (see the module's doc)."""
        return self._interning

    def before_rebuild(self, tables: Iterable[StateTable]) -> None:
        """Intern the keys of the tables about to be replaced, once: from now on rebuilt
        tables share their key strings with whoever kept keys from these."""
        if self._interning:
            return
        for table in tables:
            for key in table.data:
                self._interning = True
                intern(key)

    def fold_all(self, table: StateTable, records: list[Record]) -> None:
        """Fold records into ``table`` without producing changes (table rebuild).

        The hot loop of a resync, ``avrowalk.fold``: the same rules as ``fold``, but Avro
        values are only checked (the table keeps the bytes), without building objects.
        """
        topic, data = table.topic, table.data
        codec, limit = self._codecs[topic], self._limits[topic]
        programs = codec.programs if isinstance(codec, AvroCodec) else None
        start = 0
        limit_bytes, interning = -1 if limit is None else limit, self._interning
        try:
            while bad := avrowalk.fold(records, start, data, programs, codec.decode, limit_bytes, interning):
                index, reason, detail = bad
                self._reject(topic, records[index], reason, detail)
                start = index + 1
        finally:  # keys were added or removed, even if the fold stopped half-way
            table.keys_changed()
        self._metrics.records.labels(topic).inc(len(records))

    def fold(self, table: StateTable, record: Record) -> Change | None:
        """Apply one record to ``table``; return the change it makes, if any."""
        topic, raw_key, raw = table.topic, record.key, record.value
        if raw_key is None:
            self._reject(topic, record, "null key", "a compacted topic needs keys")
            return None
        try:
            key = intern(raw_key.decode())
        except UnicodeDecodeError as exc:
            self._reject(topic, record, "key not UTF-8", str(exc))
            return None
        codec = self._codecs[topic]
        if raw is None:
            prev = table.delete(key)
            if prev is None:
                return None
            return Change(topic, "delete", key, None, prev, record.offset, record.partition, record.timestamp, codec)
        limit = self._limits[topic]
        if limit is not None and len(raw) > limit:
            self._reject(topic, record, "oversized value", f"{len(raw)} bytes > max_value_bytes {limit}")
            return None
        try:
            value = codec.decode(raw)
        except Exception as exc:  # DecodeError, or whatever a custom codec raises
            self._reject(topic, record, "undecodable value", str(exc))
            return None
        prev = table.put(key, pack(raw, record.offset, record.partition, record.timestamp))
        if prev is not None and same_value(prev, raw) and not self._emit_identical:
            return None
        return Change(topic, "put", key, value, prev, record.offset, record.partition, record.timestamp, codec)

    def take_rejected(self) -> list[Rejected]:
        rejected, self.rejected = self.rejected, []
        return rejected

    def _reject(self, topic: str, record: Record, reason: str, detail: str) -> None:
        self._metrics.bad_records.labels(topic, reason).inc()
        log.warning(
            "skipped record %s/%d@%d key %s: %s: %s (the key keeps its previous value)",
            *(topic, record.partition, record.offset, _key_text(record.key), reason, detail),
        )
        self.rejected.append(Rejected(topic, record, reason, detail))


def _key_text(raw_key: bytes | None) -> str:
    """A record key for a log line: quoted text if it is UTF-8, else the bytes' repr."""
    if raw_key is None:
        return "(none)"
    try:
        return repr(raw_key.decode())
    except UnicodeDecodeError:
        return repr(raw_key)
