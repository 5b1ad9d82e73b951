"""Capture sources: logical replication (pgoutput) and the trigger changelog; a factory picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replicator.cdc.base import CaptureSource
    from replicator.config import Config
    from replicator.staging import StagingStore


def make_source(cfg: Config, store: StagingStore) -> CaptureSource:
    """Build the capture source the config asks for."""
    from replicator.errors import ConfigError

    if cfg.capture.mode == "logical":
        if cfg.erp.dialect != "postgresql":
            raise ConfigError(
                f"{cfg.source_path}: capture.mode = 'logical' needs a PostgreSQL ERP; "
                f'erp.dsn is {cfg.erp.dialect}: use capture.mode = "triggers"'
            )
        from replicator.cdc.logical import LogicalSource

        return LogicalSource(cfg, store)
    from replicator.cdc.triggers.source import TriggerSource

    source: CaptureSource = TriggerSource(cfg, store)
    return source
