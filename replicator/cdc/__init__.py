"""Capture sources: logical replication (pgoutput) and the trigger changelog; a factory picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replicator.errors import ConfigError

if TYPE_CHECKING:
    from replicator.cdc.base import CaptureSource
    from replicator.config import Config
    from replicator.staging import StagingStore


def make_source(cfg: Config, store: StagingStore) -> CaptureSource:
    """Build the capture source the config asks for."""
    # Import cycle: the sources import replicator.staging, which imports replicator.cdc.base, so
    # this package must not import the sources while it initialises.
    from replicator.cdc.logical import LogicalSource  # noqa: PLC0415 - import cycle (see above)
    from replicator.cdc.triggers.source import TriggerSource  # noqa: PLC0415 - import cycle

    if cfg.capture.mode == "logical":
        if cfg.erp.dialect != "postgresql":
            raise ConfigError(
                f"{cfg.source_path}: capture.mode = 'logical' needs a PostgreSQL ERP; "
                f'erp.dsn is {cfg.erp.dialect}: use capture.mode = "triggers"'
            )
        return LogicalSource(cfg, store)
    source: CaptureSource = TriggerSource(cfg, store)
    return source
