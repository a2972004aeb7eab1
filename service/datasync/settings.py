"""Service settings: environment (``DATASYNC_``, nested with ``__``), ``.env``, CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster."""

    bootstrap_servers: str = Field(default="", description="host:port[,host:port]; empty: none configured")
    client_id: str = "datasync"
    request_timeout_ms: int = Field(default=30_000, ge=1000)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by every aiokafka client we create."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
        }


class SyncSettings(BaseModel):
    """How the engine reads, retries and batches."""

    fetch_max_records: int = Field(default=5000, ge=1, description="records per CHANGE batch at most")
    resync_max_attempts: int = Field(default=5, ge=1)
    resync_backoff_s: float = Field(default=0.5, gt=0)
    resync_backoff_max_s: float = Field(default=30.0, gt=0)
    change_max_attempts: int = Field(default=3, ge=1)
    change_backoff_s: float = Field(default=0.1, ge=0)
    emit_identical_puts: bool = Field(default=False, description="deliver puts equal to the current value")
    create_topics: bool = Field(default=True, description="create declared topics that do not exist")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DATASYNC_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    topics_dir: Path = Path("topics")
    schemas_dir: Path = Path("schemas")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
