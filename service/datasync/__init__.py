"""datasync: Kafka compacted topics -> per-key state tables -> ordered plugin resyncs and changes."""

from datasync.api import Change, ChangeEvent, KeyValue, Plugin, PluginContext, PluginError, ResyncEvent
from datasync.engine import DataSync
from datasync.publish import Delivery, Publisher, PublishError
from datasync.registration import Registration
from datasync.status import PluginState, PluginStatus

__all__ = [
    "Change",
    "ChangeEvent",
    "DataSync",
    "Delivery",
    "KeyValue",
    "Plugin",
    "PluginContext",
    "PluginError",
    "PluginState",
    "PluginStatus",
    "PublishError",
    "Publisher",
    "Registration",
    "ResyncEvent",
]
