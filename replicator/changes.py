"""Change types shared by capture and staging: row changes, positions, table schemas.

Capture sources (:mod:`replicator.cdc`) produce these values and the staging store
(:mod:`replicator.staging`) consumes them; both import them from here, so staging does not
depend on capture. The contract about them:

* changes of one source transaction are delivered in commit order, and a transaction is never
  split across two positions: the position of a :class:`Checkpoint` covers whole transactions;
* ``Change.values`` holds only the columns whose new value is known: a column left out (an
  unchanged TOAST value) keeps what staging already has.

Positions are opaque text to staging (an LSN for logical replication, a changelog id for
triggers); only the source that wrote one interprets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Change", "Checkpoint", "Column", "Op", "TableSchema"]

Op = Literal["I", "U", "D", "T"]


@dataclass(frozen=True, slots=True)
class Column:
    """A source column: name, source type name (``format_type``), type OID where known."""

    name: str
    type_name: str
    type_oid: int = 0
    nullable: bool = True
    attnum: int = 0  # the column's number in the source catalog (0: not known); survives a rename


@dataclass(frozen=True, slots=True)
class TableSchema:
    """A watched table as the source describes it."""

    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, name: str) -> Column | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


@dataclass(slots=True)
class Change:
    """One row change (or a truncate) of a watched table.

    ``values``: the new row image for I/U (columns absent are unchanged); ``key``: the key of the
    row before the change for U (when the key changed) and D.
    """

    table: str
    op: Op
    values: dict[str, Any] | None = None
    key: dict[str, Any] | None = None
    position: str = ""


@dataclass(slots=True)
class Checkpoint:
    """Where a source stands in staging, written in the same transaction as the data it covers."""

    source: str
    position: str
    state: str = "streaming"  # "snapshot" while the initial copy runs, then "streaming"
    extra: dict[str, Any] = field(default_factory=dict)
