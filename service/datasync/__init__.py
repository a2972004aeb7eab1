"""datasync: Kafka compacted topics -> per-key state tables -> ordered plugin resyncs and changes."""

from importlib.metadata import PackageNotFoundError, version

from datasync.api import Change, ChangeEvent, KeyValue, Plugin, PluginContext, PluginError, ResyncEvent
from datasync.bindings import TopicSpec
from datasync.codecs import AvroCodec, BytesCodec, Codec, JsonCodec, StringCodec, codec_for
from datasync.engine import DataSync
from datasync.errors import ConfigError, DecodeError, EncodeError
from datasync.publish import Delivery, Publisher, PublishError
from datasync.registration import Registration
from datasync.schemas import SchemaStore
from datasync.settings import KafkaSettings, SyncSettings
from datasync.status import PluginState, PluginStatus

try:
    __version__ = version("datasync")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"

__all__ = [
    "AvroCodec",
    "BytesCodec",
    "Change",
    "ChangeEvent",
    "Codec",
    "ConfigError",
    "DataSync",
    "DecodeError",
    "Delivery",
    "EncodeError",
    "JsonCodec",
    "KafkaSettings",
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
    "SchemaStore",
    "StringCodec",
    "SyncSettings",
    "TopicSpec",
    "__version__",
    "codec_for",
]
