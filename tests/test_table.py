"""The state table: packed entries, prefix ranges in key order. Pure logic."""

from __future__ import annotations

from datasync.table import Entry, StateTable, pack, same_value, value_of


def test_pack_round_trip() -> None:
    packed = pack(b"value", 123456789012, 7, 1_700_000_000_000)
    assert Entry.unpack(packed) == Entry(b"value", 123456789012, 7, 1_700_000_000_000)
    assert value_of(packed) == b"value"
    assert same_value(packed, b"value") and not same_value(packed, b"valu") and not same_value(packed, b"value!")
    assert Entry.unpack(pack(b"", 0, 0, -1)) == Entry(b"", 0, 0, -1)


def test_under_returns_prefix_ranges_in_key_order() -> None:
    table = StateTable("t")
    for key in ["b/2", "a/1", "b/1", "b", "b0", "c/1", "b/10", "a", "b/\U0010ffff"]:
        table.put(key, pack(key.encode(), 0, 0, 0))
    assert [k for k, _ in table.under("b/")] == ["b/1", "b/10", "b/2", "b/\U0010ffff"]
    assert [k for k, _ in table.under("b")] == ["b", "b/1", "b/10", "b/2", "b/\U0010ffff", "b0"]
    assert [k for k, _ in table.under("")] == sorted(table.data)
    assert table.under("z") == [] and table.under("a/1/") == []
    table.delete("b/10")
    table.put("b/05", pack(b"x", 1, 0, 0))  # the order is recomputed after keys come and go
    assert [k for k, _ in table.under("b/")] == ["b/05", "b/1", "b/2", "b/\U0010ffff"]


def test_put_and_delete_return_the_previous_state() -> None:
    table = StateTable("t")
    assert table.put("k", pack(b"1", 5, 0, 0)) is None
    prev = table.put("k", pack(b"2", 6, 0, 0))
    assert prev is not None and Entry.unpack(prev).offset == 5
    assert table.get("k") == Entry(b"2", 6, 0, 0)
    deleted = table.delete("k")
    assert deleted is not None and value_of(deleted) == b"2"
    assert table.delete("k") is None and len(table) == 0


def test_prefix_ending_in_the_last_code_point() -> None:
    table = StateTable("t")
    for key in ["a\U0010ffff", "a\U0010ffffx", "b", "\U0010ffff"]:
        table.put(key, pack(b"", 0, 0, 0))
    assert table.keys_under("a\U0010ffff") == ["a\U0010ffff", "a\U0010ffffx"]
    assert table.keys_under("\U0010ffff") == ["\U0010ffff"]


def test_pages_through_a_prefix_after_a_cursor() -> None:
    table = StateTable("t")
    for key in ["a/1", "a/2", "a/3", "a/4", "b/1", "a"]:
        table.put(key, pack(b"", 0, 0, 0))
    assert table.keys_under("a/", limit=2) == ["a/1", "a/2"]
    assert table.keys_under("a/", after="a/2", limit=2) == ["a/3", "a/4"]
    assert table.keys_under("a/", after="a/4", limit=2) == []
    assert table.keys_under("a/", after="a/25") == ["a/3", "a/4"]  # a cursor need not be a key
    assert table.keys_under("a/", after="0") == ["a/1", "a/2", "a/3", "a/4"]  # before the prefix: from its start
    assert table.keys_under("", after="a/4") == ["b/1"]
