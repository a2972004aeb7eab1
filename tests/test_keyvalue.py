"""A resync's key/values: the compiled KeyValue and its iterator behave as the pure-Python twins,
and KeyValues reads its segments through either. Pure logic, no broker."""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import pytest

import datasync
from datasync import api
from datasync.codecs import BytesCodec, Codec, JsonCodec, StringCodec
from datasync.errors import DecodeError
from datasync.table import Packed, pack

try:
    from datasync import _keyvalue as compiled
except ImportError:  # built without a C compiler: only the pure-Python twins are tested
    compiled = None  # type: ignore[assignment]
needs_compiled = pytest.mark.skipif(compiled is None, reason="built without a C compiler")


class Twins(NamedTuple):
    KeyValue: Callable[[str, str, Packed, Codec], Any]
    keyvalues: Callable[[str, Codec, list[str], Mapping[str, Packed]], Iterator[Any]]


TWINS = [
    pytest.param(Twins(api._PyKeyValue, api._py_keyvalues), id="python"),
    pytest.param(Twins(compiled.KeyValue, compiled.keyvalues) if compiled else None, id="c", marks=needs_compiled),
]


@pytest.fixture(params=TWINS)
def twins(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Twins:
    """One implementation, also used by api.KeyValues."""
    impl: Twins = request.param
    monkeypatch.setattr(api, "KeyValue", impl.KeyValue)
    monkeypatch.setattr(api, "keyvalues", impl.keyvalues)
    return impl


class Counting:
    """A codec counting its decodes; it fails on values starting with ``!``."""

    spec = "counting"

    def __init__(self) -> None:
        self.decodes = 0

    def decode(self, raw: bytes) -> Any:
        self.decodes += 1
        if raw.startswith(b"!"):
            raise DecodeError(f"bad value {raw!r}")
        return [raw.decode()]

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError


def test_compiled_types_are_the_public_ones() -> None:
    assert datasync.KeyValue is api.KeyValue
    if compiled is not None:
        assert api.KeyValue is compiled.KeyValue and api.keyvalues is compiled.keyvalues
        assert api.KeyValue.__module__ == "datasync.api" and api.KeyValue.__name__ == "KeyValue"


@pytest.mark.parametrize(
    ("value", "offset", "partition", "timestamp"),
    [(b'{"a": 1}', 42, 3, 1_700_000_000_123), (b"", 0, 0, -1), (b"x" * 300, 2**63 - 1, 65535, -(2**63))],
)
def test_attributes_and_repr(twins: Twins, value: bytes, offset: int, partition: int, timestamp: int) -> None:
    kv = twins.KeyValue("tö\n", "k/ü'1", pack(value, offset, partition, timestamp), BytesCodec())
    assert (kv.topic, kv.key, kv.raw_value, kv.value) == ("tö\n", "k/ü'1", value, value)
    assert (kv.revision, kv.partition, kv.timestamp) == (offset, partition, timestamp)
    assert repr(kv) == f"KeyValue('tö\\n', \"k/ü'1\", revision={offset})"
    by_name = twins.KeyValue(topic="t", key="k", packed=pack(value, offset, 0, 0), codec=StringCodec())
    assert (by_name.topic, by_name.key, by_name.revision) == ("t", "k", offset)


def test_value_is_decoded_once_and_a_decode_error_is_not_cached(twins: Twins) -> None:
    codec = Counting()
    kv = twins.KeyValue("t", "k", pack(b"v", 1, 0, 0), codec)
    assert codec.decodes == 0 and kv.value is kv.value and kv.value == ["v"] and codec.decodes == 1
    bad = twins.KeyValue("t", "k", pack(b"!v", 1, 0, 0), codec)
    for decodes in (2, 3):  # raised by every read, as the codec raises it
        with pytest.raises(DecodeError, match="bad value"):
            _ = bad.value
        assert codec.decodes == decodes
    assert bad.raw_value == b"!v" and bad.revision == 1
    with pytest.raises(DecodeError, match="invalid JSON"):
        _ = twins.KeyValue("t", "k", pack(b"{", 1, 0, 0), JsonCodec()).value


def test_keyvalues_looks_states_up_as_it_goes(twins: Twins) -> None:
    codec = StringCodec()
    data = {"a": pack(b"1", 0, 0, 0), "c": pack(b"3", 2, 1, 0)}
    assert [(kv.key, kv.value, kv.revision) for kv in twins.keyvalues("t", codec, ["a", "c"], data)] == [
        ("a", "1", 0),
        ("c", "3", 2),
    ]
    assert list(twins.keyvalues("t", codec, [], data)) == []


@pytest.mark.parametrize("missing", [0, 1, 15, 16, 17, 39])  # the compiled iterator looks 16 keys ahead
def test_a_missing_key_raises_where_it_is_reached(twins: Twins, missing: int) -> None:
    keys = [f"k{i:02d}" for i in range(40)]
    data = {key: pack(key.encode(), i, 0, 0) for i, key in enumerate(keys) if i != missing}
    items = twins.keyvalues("t", StringCodec(), keys, data)
    got = []
    with pytest.raises(KeyError) as raised:
        for kv in items:
            got.append(kv.key)
    assert got == keys[:missing] and raised.value.args == (keys[missing],)  # as data[key] says it
    assert list(items) == []  # an error ends the iteration, as it ends a generator


class Reentrant(dict[str, Packed]):
    """A mapping whose lookups read the iterator doing them."""

    items: Iterator[Any]

    def __getitem__(self, key: str) -> Packed:
        next(self.items)
        return super().__getitem__(key)


def test_keyvalues_is_not_reentrant(twins: Twins) -> None:
    data = Reentrant(k=pack(b"v", 0, 0, 0))
    data.items = twins.keyvalues("t", StringCodec(), ["k"], data)
    with pytest.raises(ValueError, match="already executing"):
        next(data.items)


def test_keyvalues_of_several_segments(twins: Twins) -> None:
    left = {f"p/{i}": pack(f"L{i}".encode(), i, 0, 0) for i in range(3)}
    right = {f"p/{i}": pack(f"R{i}".encode(), 10 + i, 1, 0) for i in range(2)}
    strings, counting = StringCodec(), Counting()
    values = api.KeyValues(
        [("l", strings, sorted(left), left), ("e", strings, [], {}), ("r", counting, sorted(right), right)]
    )
    expected = [("l", "p/0", "L0"), ("l", "p/1", "L1"), ("l", "p/2", "L2"), ("r", "p/0", ["R0"]), ("r", "p/1", ["R1"])]
    assert len(values) == 5 and [(kv.topic, kv.key, kv.value) for kv in values] == expected
    assert all(isinstance(kv, api.KeyValue) for kv in values)
    assert [(values[i].topic, values[i].key) for i in (0, 2, 3, -1, -5)] == [
        ("l", "p/0"),
        ("l", "p/2"),
        ("r", "p/0"),
        ("r", "p/1"),
        ("l", "p/0"),
    ]
    for index in (5, -6):
        with pytest.raises(IndexError):
            values[index]
    assert [kv.revision for kv in values[1:4]] == [1, 2, 10]
    assert [kv.key for kv in values[::-2]] == ["p/1", "p/2", "p/0"]
    everything = [(kv.topic, kv.revision) for kv in values]
    for cut in (slice(0, 5), slice(2, 4), slice(3, None), slice(-2, None), slice(4, 2), slice(-9, 9), slice(3, 3)):
        assert [(kv.topic, kv.revision) for kv in values[cut]] == everything[cut], cut
    assert len(api.KeyValues([])) == 0 and list(api.KeyValues([])) == []
    del left["p/1"]  # the table changed under a KeyValues: as data[key] says it
    with pytest.raises(KeyError):
        list(values)


@needs_compiled
def test_compiled_keyvalue_checks_its_arguments() -> None:
    with pytest.raises(TypeError):
        compiled.KeyValue("t", b"k", pack(b"", 0, 0, 0), StringCodec())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        compiled.KeyValue("t", "k", bytearray(pack(b"", 0, 0, 0)), StringCodec())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no 18-byte trailer"):
        compiled.KeyValue("t", "k", b"short", StringCodec())
    with pytest.raises(TypeError):
        compiled.keyvalues("t", StringCodec(), ("k",), {})  # type: ignore[arg-type]
    kv = compiled.KeyValue("t", "k", pack(b"", 0, 0, 0), StringCodec())
    with pytest.raises(AttributeError):
        kv.key = "other"  # type: ignore[misc]
    items = compiled.keyvalues("t", StringCodec(), ["a", "short", "missing"], {"a": pack(b"", 0, 0, 0), "short": b""})
    assert next(items).key == "a"
    with pytest.raises(ValueError, match="no 18-byte trailer"):  # the first failure, where it is reached
        next(items)
    assert list(items) == []


class Cyclic(Counting):
    """A codec that keeps what it was given, making reference cycles through KeyValues."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Any] = []


@needs_compiled
def test_compiled_cycles_are_collected() -> None:
    codec = Cyclic()
    kv = compiled.KeyValue("t", "k", pack(b"v", 0, 0, 0), codec)
    codec.kept.append(kv)  # kv -> codec -> kv
    data = {"k": pack(b"v", 0, 0, 0)}
    items = compiled.keyvalues("t", codec, ["k"], data)
    codec.kept.append(items)  # iterator -> codec -> iterator
    ahead = compiled.keyvalues("t", codec, ["k", "k"], data)
    codec.kept.append(ahead)
    next(ahead)  # iterator -> the KeyValue it built ahead -> codec -> iterator
    kv.value.append(kv)  # kv -> its value -> kv
    gone = weakref.ref(codec)
    del codec, kv, items, ahead
    gc.collect()
    assert gone() is None


@needs_compiled
def test_compiled_leaks_no_references() -> None:
    topic, key, codec, packed = "t", "k", Counting(), pack(b"v", 0, 0, 0)
    data, keys, nope = {key: packed}, [key], "nope"
    missing = [nope]
    objects = (topic, key, codec, packed, data, keys, nope, missing)
    before = [sys.getrefcount(o) for o in objects]
    for _ in range(100):
        assert [(kv.value, kv.raw_value, repr(kv)) for kv in compiled.keyvalues(topic, codec, keys, data)]
        with pytest.raises(KeyError):
            list(compiled.keyvalues(topic, codec, missing, data))
        with pytest.raises(KeyError):
            list(compiled.keyvalues(topic, codec, keys + missing + keys, data))
        next(compiled.keyvalues(topic, codec, keys * 20 + missing, data))  # dropped with KeyValues built ahead
        with pytest.raises(ValueError):  # a KeyValue that cannot be built, before a missing key
            list(compiled.keyvalues(topic, codec, [*keys, "short", *missing], {**data, "short": b""}))
        with pytest.raises(DecodeError):
            _ = compiled.KeyValue(topic, key, pack(b"!", 0, 0, 0), codec).value
    assert [sys.getrefcount(o) for o in objects] == before


def test_copies_carry_the_state_and_decode_their_own_value_and_pickling_is_refused(twins: Twins) -> None:
    """What a plugin that copies what it keeps gets: the same key, value and trailer fields, and
    a value of its own (decoded again), with the codec shared rather than copied. Pickling would
    carry the codec (a registry codec's credentials): refused, with what to keep instead."""
    kv = twins.KeyValue("t", "k", pack(b'{"a": [1]}', 5, 2, 7), JsonCodec())
    value = kv.value
    for other in (copy.copy(kv), copy.deepcopy(kv), copy.deepcopy([kv])[0]):
        assert type(other) is type(kv) and other is not kv
        assert (other.topic, other.key, other.raw_value) == (kv.topic, kv.key, kv.raw_value)
        assert (other.revision, other.partition, other.timestamp) == (5, 2, 7)
        assert other.value == value and other.value is not value
    with pytest.raises(TypeError, match=r"keep kv\.key and kv\.value"):
        pickle.dumps(kv)
