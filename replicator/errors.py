"""The exception tree of sync-daemon.

Everything the daemon raises on purpose derives from :class:`SyncError`. Failures are classified
the Debezium way: :class:`RetryableError` (connection lost, server restarting: reconnect and
resume) versus :class:`FatalError` (a slot that vanished, a bad schema: stop that source and say
why). Driver exceptions are mapped to these at the boundary where they occur, by the rules of
:mod:`replicator.errors_map` (the one place that reads SQLSTATEs, MySQL error numbers and
driver exception classes).

Each class of failure has its own exit code (the systemd unit does not restart on 2, 3 and 4,
``RestartPreventExitStatus``):

====  ==============================================================================
0     ok
1     failure at run time that a retry may fix (a server unreachable, a crash)
2     usage or configuration error
3     the source needs a person: slot gone, schema not capturable, a second daemon
4     access refused: bad password, no such database or role, missing privilege,
      a staging path that cannot be opened
5     ``status``: the daemon is not running
====  ==============================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_SOURCE = 3
EXIT_ACCESS = 4
EXIT_NOT_RUNNING = 5


class SyncError(Exception):
    """Base class of every error sync-daemon raises on purpose."""

    exit_code = EXIT_FAILURE


class ConfigError(SyncError):
    """The configuration is invalid; the message names the file, the key and the bad value."""

    exit_code = EXIT_CONFIG


class RetryableError(SyncError):
    """A transient failure: the operation may succeed if retried after a pause."""


class FatalError(SyncError):
    """A failure a person must act on; retrying will not help."""

    exit_code = EXIT_SOURCE


class AccessError(FatalError):
    """Access refused (credentials, database, role, privilege, a path): fix access, then start."""

    exit_code = EXIT_ACCESS


class SlotMissingError(FatalError):
    """A replication slot that existed is gone; only ``sync-daemon resync`` may recreate it."""


class SchemaError(FatalError):
    """The source schema does not allow capture as configured (e.g. no primary key)."""


class DaemonAlreadyRunning(FatalError):
    """Another daemon already captures this source."""
