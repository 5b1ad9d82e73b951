"""The exception tree of sync-daemon.

Everything the daemon raises on purpose derives from :class:`SyncError`. Failures are classified
the Debezium way: :class:`RetryableError` (connection lost, server restarting: reconnect and
resume) versus :class:`FatalError` (a slot that vanished, a bad schema: stop that source and say
why). Driver exceptions are mapped to these at the boundary where they occur.
"""

from __future__ import annotations


class SyncError(Exception):
    """Base class of every error sync-daemon raises on purpose."""


class ConfigError(SyncError):
    """The configuration is invalid; the message names the file, the key and the bad value."""


class RetryableError(SyncError):
    """A transient failure: the operation may succeed if retried after a pause."""


class FatalError(SyncError):
    """A failure a person must act on; retrying will not help."""


class SlotMissingError(FatalError):
    """A replication slot that existed is gone; only ``sync-daemon resync`` may recreate it."""


class SchemaError(FatalError):
    """The source schema does not allow capture as configured (e.g. no primary key)."""


class DaemonAlreadyRunning(FatalError):
    """Another daemon already captures this source."""
