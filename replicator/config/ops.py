"""Config sections of operations: ``[notify]`` and ``[schedules]`` (owned by operations)."""

from __future__ import annotations

from replicator.config.core import Section


class NotifySection(Section):
    """``[notify]``: e-mail and webhook notifications of incidents."""

    enabled: bool = False


class SchedulesSection(Section):
    """``[schedules]``: crontab-syntax schedule per service."""
