"""Config sections for running beyond one box: ``[stream]`` (publish the change journal to NATS
JetStream), ``[ha]`` (an active and a standby daemon sharing one lease), and the config file of
``sync-daemon consume`` (a mirror fed from the stream, no slot on the ERP).

Example::

    [stream]
    url = "nats://127.0.0.1:4222"
    stream = "SYNC"
    subject_prefix = "sync"
    replicas = 1                # 3 on a three-node JetStream cluster
    max_age_days = 7            # retention of the stream (limits policy, file storage)
    duplicate_window = 600      # seconds JetStream remembers a Nats-Msg-Id

    [ha]
    enabled = true
    node = "erp-sync-a"         # unique per host
    lease_seconds = 15          # a standby takes over this long after the active stopped renewing
    renew_seconds = 5
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from replicator.config.core import LoggingSection, Section

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _nats_url(v: str) -> str:
    for part in v.split(","):
        if not part.strip().startswith(("nats://", "tls://")):
            raise ValueError("must be nats://host:port (several separated by commas)")
    return v


class StreamSection(Section):
    """``[stream]``: where the change journal is published."""

    url: str = "nats://127.0.0.1:4222"
    stream: str = "SYNC"
    subject_prefix: str = "sync"
    replicas: int = Field(default=1, ge=1, le=5)
    max_age_days: float = Field(default=7.0, gt=0)
    duplicate_window: float = Field(default=600.0, ge=10)
    # Journal entries published per round (one PubAck wait for all of them).
    batch: int = Field(default=5000, ge=1, le=100_000)
    # Seconds one publish round may wait for its PubAcks before it counts as an outage.
    timeout: float = Field(default=10.0, gt=0)
    # Alert when this many journal entries wait for the stream (NATS down or too slow).
    max_backlog: int = Field(default=100_000, ge=1)

    _url = field_validator("url")(classmethod(lambda cls, v: _nats_url(v)))

    @field_validator("stream", "subject_prefix")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError(f"{v!r} must be letters, digits, _ and - (no dots or spaces)")
        return v

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.url.split(",")]


class HaSection(Section):
    """``[ha]``: one active and one standby daemon on a shared PostgreSQL staging store."""

    enabled: bool = False
    node: str = ""
    lease_seconds: float = Field(default=15.0, ge=3, le=300)
    renew_seconds: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> HaSection:
        if self.enabled and not self.node:
            raise ValueError("node: a name for this daemon is required when ha is enabled")
        if self.renew_seconds * 2 > self.lease_seconds:
            raise ValueError("renew_seconds must be at most half of lease_seconds")
        return self


class ConsumerSection(Section):
    """``[consumer]`` of ``sync-daemon consume``: the durable consumer and where it mirrors."""

    durable: str = "mirror"
    # Only these sources' changes (the ``source`` part of the subject); all when empty.
    source: str = "*"
    staging_url: SecretStr
    batch: int = Field(default=1000, ge=1, le=10_000)

    @field_validator("durable")
    @classmethod
    def _durable(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError(f"{v!r} must be letters, digits, _ and -")
        return v


class ConsumeConfig(Section):
    """The whole config file of ``sync-daemon consume``."""

    stream: StreamSection = Field(default_factory=StreamSection)
    consumer: ConsumerSection
    logging: LoggingSection = Field(default_factory=LoggingSection)
    source_path: str = ""

    def resolve(self, p: str) -> Path:
        path = Path(p)
        return (
            path
            if path.is_absolute() or not self.source_path
            else Path(self.source_path).parent / path
        )
