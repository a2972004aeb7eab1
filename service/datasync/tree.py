"""Finding the files of ``topics/`` and ``schemas/``: every one read, none silently left out."""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import Path

from datasync.errors import ConfigError


def files_under(directory: Path, pattern: str) -> list[Path]:
    """The files whose names match ``pattern`` below ``directory`` (sub-directories too), in path order.

    Hidden names (``.x``) are skipped: a Kubernetes ConfigMap mount holds a second copy of every file
    under ``..data`` and ``..2024_01_01/``, and editors leave lock files like ``.#demo.yaml``. A directory
    that cannot be listed is a ConfigError naming it: what it holds must not go missing unnoticed.
    """
    found: list[Path] = []
    try:
        with os.scandir(directory) as scan:
            entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if fnmatchcase(entry.name, pattern):  # a directory named so too: reading it names it
                found.append(Path(entry.path))
            elif entry.is_dir():
                found += files_under(Path(entry.path), pattern)
    except OSError as exc:
        raise ConfigError(str(directory), "", f"cannot read: {exc.strerror or exc}") from exc
    return found
