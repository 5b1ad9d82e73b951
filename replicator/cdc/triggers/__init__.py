"""Trigger-based capture: triggers write every row change into a changelog table; the daemon reads
it into staging with the same exactly-once guarantee as logical replication.

For ERPs where logical replication is not available: a managed PostgreSQL without REPLICATION,
a ``wal_level`` the DBA will not change, MariaDB ERPs (ERPNext, Dolibarr) and embedded SQLite.

* :mod:`.dialects` — changelog DDL, trigger templates, install/status/uninstall, introspection;
* :mod:`.decode` — JSON row images back into typed Python values;
* :mod:`.source` — :class:`TriggerSource`, the capture source (and why its ordering is correct).
"""

from replicator.cdc.triggers.dialects import VERSION, TableStatus, dialect_for
from replicator.cdc.triggers.source import TriggerSource

__all__ = ["VERSION", "TableStatus", "TriggerSource", "dialect_for"]
