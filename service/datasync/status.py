"""Per-plugin status: what the engine knows about each plugin's feedback."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class PluginState(enum.StrEnum):
    RESYNCING = "resyncing"  # waiting for (or running, or retrying) a full resync
    READY = "ready"  # resynced; receives changes
    FAILED = "failed"  # resync_max_attempts failures in a row; still retried, with capped backoff


@dataclass
class PluginStatus:
    state: PluginState = PluginState.RESYNCING
    last_error: str | None = None
    resync_attempts: int = 0
    last_resync_at: float | None = None  # unix time of the last successful resync
    last_resync_seconds: float | None = None
    changes_applied: int = 0
    change_failures: int = 0
    failed_since: float | None = None  # unix time the plugin entered FAILED
    next_attempt_at: float | None = None  # unix time of the next start/resync attempt
    queued: int = 0  # changes waiting for (or in) the plugin's current call

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out
