# The compiled walk (_avrowalk.c); the pure-Python originals in avrowalk.py document it.
from collections.abc import Callable
from typing import Any

from datasync.avrowalk import Program, Records, Rejection

def check(program: Program, raw: bytes, /) -> None: ...
def decode(program: Program, raw: bytes, /) -> Any: ...
def fold(
    records: Records,
    start: int,
    data: dict[str, bytes],
    programs: dict[bytes, Program] | None,
    fallback: Callable[[bytes], Any],
    limit: int,
    intern: bool,
    /,
) -> Rejection | None: ...
