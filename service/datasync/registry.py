"""A client of a Confluent-compatible schema registry: writer schemas by id, ids by subject.

Writer schemas are fetched once per id and kept in a bounded LRU cache; ids
the registry does not know are remembered for a while too (bounded by the same
cache), so a topic full of records with a bogus id costs one request, not one
per record. Fetching is async and done *before* a batch is decoded
(``load``); decoding then only reads the cache, synchronously.

Errors say what to do about them: ``SchemaNotFound`` and ``BadSchema`` are
answers (the record is bad), ``RegistryUnavailable`` is not (retry: the record
may be fine). Credentials go into headers only; URLs are logged without any
user-info part.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from datasync.settings import RegistrySettings

log = logging.getLogger("datasync.registry")

MISSING_TTL_S = 60.0  # how long "the registry has no schema with this id" is believed
MAX_REFERENCE_DEPTH = 16
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

T = TypeVar("T")


class RegistryError(Exception):
    """Something about the schema registry; the subclasses say whether retrying can help."""


class RegistryUnavailable(RegistryError):
    """No registry answered usefully (unreachable, timed out, 5xx, not authorised): retry later."""


class SchemaNotFound(RegistryError):
    """The registry answered that it has no such schema id or subject."""


class BadSchema(RegistryError):
    """The registry's schema cannot be used (not Avro, unparseable), or it refused ours (409/422)."""


@dataclass(frozen=True)
class WriterSchema:
    id: int
    parsed: Any
    fullname: str
    fingerprint: bytes  # CRC-64-AVRO of the canonical form: equal to a reader's means "no resolution needed"


@dataclass(frozen=True)
class _Missing:
    reason: str
    until: float


def redact(url: str) -> str:
    """A URL fit for logs: without ``user:password@``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return parts._replace(netloc=host).geturl()


class RegistryClient:
    """One registry (several URLs are tried in turn) and the schema cache of every codec using it."""

    def __init__(self, settings: RegistrySettings) -> None:
        if not settings.url_list:
            raise ValueError("no schema registry configured (DATASYNC_REGISTRY__URLS)")
        self.settings = settings
        self._urls = settings.url_list
        self._cache: OrderedDict[int, WriterSchema | _Missing] = OrderedDict()
        self.evictions = 0  # schemas dropped from the cache so far (a value read before may need one again)
        self._ids: dict[tuple[str, str], int] = {}  # (subject, schema text) -> id, for writing

    # -- reading --------------------------------------------------------------

    def cached(self, schema_id: int) -> WriterSchema | str:
        """The writer schema of ``schema_id``, or why it cannot be had (without any I/O)."""
        entry = self._cache.get(schema_id)
        if entry is None:
            return f"writer schema id {schema_id} is not loaded (more ids in use than DATASYNC_REGISTRY__CACHE_SIZE?)"
        return entry if isinstance(entry, WriterSchema) else entry.reason

    async def load(self, ids: Iterable[int], retry: bool = True) -> None:
        """Make sure every id is in the cache, as a schema or as a known miss.

        With ``retry``, an unreachable registry is waited for (backing off)
        rather than reported: the records waiting for these ids are not bad.
        """
        now = time.monotonic()
        todo = []
        for schema_id in ids:
            entry = self._cache.get(schema_id)
            if entry is None or (isinstance(entry, _Missing) and entry.until <= now):
                todo.append(schema_id)
            else:
                self._cache.move_to_end(schema_id)  # in use: evicted last (decoding does not touch the order)
        if not todo:
            return
        async with self._session() as session:
            for schema_id in todo:
                self._remember(schema_id, await self._retrying(partial(self._fetch, session, schema_id), retry))

    def _remember(self, schema_id: int, entry: WriterSchema | _Missing) -> None:
        self._cache[schema_id] = entry
        self._cache.move_to_end(schema_id)
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)
            self.evictions += 1

    async def _fetch(self, session: aiohttp.ClientSession, schema_id: int) -> WriterSchema | _Missing:
        try:
            body = await self._call(session, "GET", f"/schemas/ids/{schema_id}")
            named: dict[str, Any] = {}
            await self._references(session, body.get("references") or [], named, 0)
            parsed = _parse(body, named)
        except (SchemaNotFound, BadSchema) as exc:
            log.warning("schema id %d: %s", schema_id, exc)
            return _Missing(f"schema id {schema_id}: {exc}", time.monotonic() + MISSING_TTL_S)
        fullname = parsed.get("name", "") if isinstance(parsed, dict) else ""
        log.info("schema id %d: %s loaded", schema_id, fullname or "(unnamed type)")
        try:
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        except Exception:  # a form fastavro cannot write canonically: always resolve
            fp = b""
        return WriterSchema(schema_id, parsed, str(fullname), fp)

    async def _references(
        self, session: aiohttp.ClientSession, refs: list[Any], named: dict[str, Any], depth: int
    ) -> None:
        """Parse the schemas a schema refers to (depth first) into ``named``."""
        if depth > MAX_REFERENCE_DEPTH:
            raise BadSchema(f"schema references nested deeper than {MAX_REFERENCE_DEPTH}")
        for ref in refs:
            try:
                subject, version = str(ref["subject"]), int(ref["version"])
            except (TypeError, KeyError, ValueError) as exc:
                raise BadSchema(f"malformed schema reference {ref!r}") from exc
            if ref.get("name") in named:  # already parsed through another reference
                continue
            body = await self._call(session, "GET", f"/subjects/{quote(subject, safe='')}/versions/{version}")
            await self._references(session, body.get("references") or [], named, depth + 1)
            _parse(body, named)

    # -- writing --------------------------------------------------------------

    async def id_for(self, subject: str, schema: dict[str, Any], attempts: int = 3) -> int:
        """The id of ``schema`` under ``subject``: registered if missing and allowed, else looked up."""
        text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
        known = self._ids.get((subject, text))
        if known is not None:
            return known
        path = f"/subjects/{quote(subject, safe='')}"
        if self.settings.auto_register:
            path += "/versions"
        async with self._session() as session:
            body = await self._retrying(lambda: self._call(session, "POST", path, {"schema": text}), attempts)
        try:
            schema_id = int(body["id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadSchema(f"subject {subject}: no id in the registry's answer") from exc
        self._ids[(subject, text)] = schema_id
        return schema_id

    # -- HTTP -----------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        """A session per operation: lookups are rare (once per id), so nothing lives between them."""
        headers = {"Accept": CONTENT_TYPE}
        s = self.settings
        if s.bearer_token is not None:
            headers["Authorization"] = f"Bearer {s.bearer_token.get_secret_value()}"
        elif s.username is not None and s.password is not None:
            pair = f"{s.username}:{s.password.get_secret_value()}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        timeout = aiohttp.ClientTimeout(total=s.timeout_s)
        context = self.settings.ssl_context
        connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
        return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)

    async def _retrying(self, call: Callable[[], Awaitable[T]], retry: bool | int) -> T:
        """Run ``call()`` until it does not raise RegistryUnavailable: forever (True), once, or N times."""
        attempts = 1 if retry is False else (None if retry is True else int(retry))
        delay = self.settings.retry_backoff_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except RegistryUnavailable as exc:
                if attempts is not None and attempt >= attempts:
                    raise
                log.warning("schema registry unavailable (attempt %d), retrying in %.1fs: %s", attempt, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_backoff_max_s)

    async def _call(
        self, session: aiohttp.ClientSession, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One request, to each URL in turn until one answers; raises a RegistryError subclass."""
        problems = []
        for i, base in enumerate(self._urls):
            try:
                async with session.request(method, base + path, json=body) as response:
                    text = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problems.append(f"{redact(base)}: {exc or type(exc).__name__}")
                continue
            if status == 200:
                if i:  # answer from a later URL: try it first next time
                    self._urls = [*self._urls[i:], *self._urls[:i]]
                try:
                    answer = json.loads(text)
                except ValueError as exc:
                    raise BadSchema(f"{method} {path}: the registry's answer is not JSON") from exc
                if not isinstance(answer, dict):
                    raise BadSchema(f"{method} {path}: unexpected answer {text[:200]!r}")
                return answer
            message = _message(text)
            if status == 404:
                raise SchemaNotFound(message)
            if status in (409, 422):
                raise BadSchema(f"the registry refused it ({status}): {message}")
            problems.append(f"{redact(base)}: HTTP {status}: {message}")
        raise RegistryUnavailable("; ".join(problems))


def _message(text: str) -> str:
    try:
        return str(json.loads(text)["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


def _parse(body: dict[str, Any], named: dict[str, Any]) -> Any:
    """Parse a registry answer's Avro schema; named types go into ``named`` for later schemas."""
    kind = body.get("schemaType", "AVRO")
    if kind != "AVRO":
        raise BadSchema(f"a {kind} schema, not Avro")
    try:
        return fastavro.parse_schema(json.loads(body["schema"]), named_schemas=named)
    except Exception as exc:  # KeyError, JSON errors, fastavro's SchemaParseException and friends
        raise BadSchema(f"unusable schema: {exc!r}") from exc
