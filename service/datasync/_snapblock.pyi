# The compiled block fill (_snapblock.c); the pure-Python original in snapshotfile.py documents it.
def fill(
    data: dict[str, bytes],
    n: int,
    text: bytes,
    key_lengths: bytes,
    value_lengths: bytes,
    body: bytes,
    intern: bool,
    /,
) -> int: ...
