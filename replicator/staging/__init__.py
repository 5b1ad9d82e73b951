"""The staging store: the one owner of the staging database's schema and of the SQL against it.

See :mod:`replicator.staging.schema` for every table and its owner module. Users import from
here: :class:`StagingStore` (the facade), :class:`ApplyTxn` (the apply path) and the value
helpers other writers of staging rows share.
"""

from replicator.staging.apply import ApplyTxn
from replicator.staging.engine import StagingDb, shared_engine
from replicator.staging.journal import Journal, JournalReader
from replicator.staging.mirrors import MirrorInfo, Mirrors
from replicator.staging.rows import MirrorRows
from replicator.staging.store import StagingStore
from replicator.staging.values import column_category, key_json, scalar_text, to_json

SYSTEM_TABLES = (
    "sync_checkpoints",
    "sync_journal",
    "sync_cursors",
    "sync_tables",
)

__all__ = [
    "SYSTEM_TABLES",
    "ApplyTxn",
    "Journal",
    "JournalReader",
    "MirrorInfo",
    "MirrorRows",
    "Mirrors",
    "StagingDb",
    "StagingStore",
    "column_category",
    "key_json",
    "scalar_text",
    "shared_engine",
    "to_json",
]
