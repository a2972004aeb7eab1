"""datasync: Kafka compacted topics -> per-key state tables -> ordered plugin resyncs and changes."""

from datasync.api import Change, ChangeEvent, KeyValue, Plugin, PluginContext, ResyncEvent
from datasync.engine import DataSync
from datasync.registration import Registration
from datasync.status import PluginState, PluginStatus

__all__ = [
    "Change",
    "ChangeEvent",
    "DataSync",
    "KeyValue",
    "Plugin",
    "PluginContext",
    "PluginState",
    "PluginStatus",
    "Registration",
    "ResyncEvent",
]
