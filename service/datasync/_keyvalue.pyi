# The compiled KeyValue (_keyvalue.c); the pure-Python originals in api.py document it.
from collections.abc import Iterator, Mapping
from typing import Any, Final, final

from datasync.codecs import Codec
from datasync.table import Packed

@final
class KeyValue:
    # read-only attributes
    topic: Final[str]
    key: Final[str]
    value: Final[Any]
    raw_value: Final[bytes]
    revision: Final[int]
    partition: Final[int]
    timestamp: Final[int]
    def __init__(self, topic: str, key: str, packed: Packed, codec: Codec) -> None: ...
    def __copy__(self) -> KeyValue: ...
    def __deepcopy__(self, memo: dict[int, Any], /) -> KeyValue: ...
    def __reduce__(self) -> tuple[Any, ...]: ...

def keyvalues(topic: str, codec: Codec, keys: list[str], data: Mapping[str, Packed], /) -> Iterator[KeyValue]: ...
