"""Per-plugin status: what the engine knows about each plugin's feedback."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class PluginState(enum.StrEnum):
    RESYNCING = "resyncing"  # waiting for (or running, or retrying) a full resync
    READY = "ready"  # resynced; receives changes
    FAILED = "failed"  # resync retries exhausted; waits for the next full resync


@dataclass
class PluginStatus:
    state: PluginState = PluginState.RESYNCING
    last_error: str | None = None
    resync_attempts: int = 0
    last_resync_at: float | None = None  # unix time of the last successful resync
    last_resync_seconds: float | None = None
    changes_applied: int = 0
    change_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out
