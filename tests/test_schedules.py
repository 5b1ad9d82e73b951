"""Schedules: parsing, next runs, due-ness, descriptions, and the [schedules]/[notify] config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from replicator.config import parse_config
from replicator.config.ops import NotifySection, SchedulesSection
from replicator.errors import ConfigError
from replicator.schedules import Schedule, Scheduler

T0 = datetime(2026, 11, 22, 6, 2, 30, tzinfo=UTC)


def test_cron_next_runs() -> None:
    s = Schedule.parse("*/5 * * * *", "schedules.orders")
    assert s.kind == "cron"
    assert s.next_runs(3, T0) == [
        T0.replace(minute=5, second=0),
        T0.replace(minute=10, second=0),
        T0.replace(minute=15, second=0),
    ]
    sweep = Schedule.parse("30 2 * * *")
    assert sweep.next_runs(2, T0) == [
        datetime(2026, 11, 23, 2, 30, tzinfo=UTC),
        datetime(2026, 11, 24, 2, 30, tzinfo=UTC),
    ]


def test_interval_and_continuous() -> None:
    s = Schedule.parse("every 5m")
    assert s.kind == "interval" and s.interval == timedelta(minutes=5)
    assert s.next_runs(2, T0) == [T0 + timedelta(minutes=5), T0 + timedelta(minutes=10)]
    assert s.due(T0) is True  # never ran
    assert s.due(T0, last_run=T0 - timedelta(minutes=4)) is False
    assert s.due(T0, last_run=T0 - timedelta(minutes=5)) is True
    assert Schedule.parse("every 2 hours").interval == timedelta(hours=2)
    assert Schedule.parse("every day").interval == timedelta(days=1)
    assert Schedule.parse("Every 30s").interval == timedelta(seconds=30)

    c = Schedule.parse("continuous")
    assert c.kind == "continuous"
    assert c.due(T0, last_run=T0) is True
    assert c.next_runs(3, T0) == []


def test_cron_due() -> None:
    s = Schedule.parse("*/5 * * * *")
    at_five = T0.replace(minute=5, second=10)
    assert s.due(at_five) is True  # in a matching minute
    assert s.due(T0) is False  # 06:02 does not match
    assert s.due(at_five, last_run=T0) is True  # the 06:05 slot lies in (last, now]
    assert s.due(at_five, last_run=at_five.replace(second=1)) is False  # already ran this slot
    # A loop that was busy past a slot still runs it once afterwards.
    assert s.due(T0.replace(minute=7), last_run=T0) is True


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("*/5 * * * *", "every 5 minutes"),
        ("* * * * *", "every minute"),
        ("0 * * * *", "every hour"),
        ("15 * * * *", "every hour at minute 15"),
        ("30 2 * * *", "at 02:30 every day"),
        ("0 2 * * *", "at 02:00 every day"),
        ("0 8,17 * * *", "at 08:00 and 17:00 every day"),
        ("0 7 * * 1-5", "at 07:00 on weekdays"),
        ("0 7 * * 1", "at 07:00 on Monday"),
        ("0 3 1 * *", "at 03:00 on day 1 of every month"),
        ("0 */6 * * *", "every 6 hours"),
        ("@daily", "at 00:00 every day"),
        ("@hourly", "every hour"),
        ("every 5m", "every 5 minutes"),
        ("every 90s", "every 90 seconds"),
        ("every 1h", "every hour"),
        ("every 2d", "every 2 days"),
        ("continuous", "continuously"),
        ("0 0 1-7 * 1", "cron 0 0 1-7 * 1"),  # not a common form: shown as it is
    ],
)
def test_describe(expr: str, words: str) -> None:
    assert Schedule.parse(expr).describe() == words


@pytest.mark.parametrize(
    "expr",
    ["", "61 * * * *", "* * * *", "*/5 * * * * *", "every 5 fortnights", "every 0m", "daily"],
)
def test_invalid_expression_names_the_key(expr: str) -> None:
    with pytest.raises(ConfigError, match=r"^schedules\.orders = "):
        Schedule.parse(expr, "schedules.orders")


def test_scheduler_tracks_services() -> None:
    section = SchedulesSection(orders="every 5m")
    sched = Scheduler(section.all(), started=T0)
    assert set(sched.schedules) == {"orders", "reconcile", "capture", "invoices"}
    # Interval and continuous services run at once; crontab ones wait for their slot.
    assert sched.due(T0) == ["orders", "capture", "invoices"]
    sched.done("orders", T0)
    sched.done("invoices", T0 + timedelta(minutes=1))
    assert sched.due(T0 + timedelta(minutes=1)) == ["capture"]
    at_seven = T0.replace(hour=7, minute=0, second=5)
    assert sched.due(at_seven) == ["orders", "reconcile", "capture", "invoices"]
    sched.done("reconcile", at_seven)
    assert "reconcile" not in sched.due(at_seven + timedelta(seconds=30))
    assert sched.next_run("reconcile") == T0.replace(hour=8, minute=0, second=0)
    assert sched.next_run("capture") is None


def _base() -> dict[str, Any]:
    return {"erp": {"dsn": "postgresql://sync@127.0.0.1/erp"}, "capture": {"tables": ["stock"]}}


def test_schedules_section_from_config() -> None:
    cfg = parse_config(_base())
    assert cfg.schedules.orders == "*/5 * * * *"
    assert cfg.schedules.schedule("capture").kind == "continuous"
    cfg = parse_config({**_base(), "schedules": {"orders": "every 2m"}})
    assert cfg.schedules.schedule("orders").describe() == "every 2 minutes"
    with pytest.raises(ConfigError, match=r"schedules\.orders = '\*/5 \* \*'"):
        parse_config({**_base(), "schedules": {"orders": "*/5 * *"}}, "/etc/x.toml")
    with pytest.raises(ConfigError, match=r"schedules\.ordres: unknown key"):
        parse_config({**_base(), "schedules": {"ordres": "*/5 * * * *"}})


def test_notify_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert NotifySection().enabled is False
    pw = tmp_path / "smtp-password"
    pw.write_text("mail-s3cret\n")
    smtp_data: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 2525,
        "starttls": False,
        "username": "sync",
        "password_file": str(pw),
        "from": "sync@example.com",
        "to": ["ops@example.com"],
    }
    data: dict[str, Any] = {
        "enabled": True,
        "reminder_minutes": 5,
        "smtp": smtp_data,
    }
    cfg = parse_config({**_base(), "notify": data})
    smtp = cfg.notify.smtp
    assert smtp is not None
    assert smtp.sender == "sync@example.com"
    assert smtp.password is not None and smtp.password.get_secret_value() == "mail-s3cret"
    assert "mail-s3cret" not in repr(cfg.notify)

    monkeypatch.setenv("SMTP_PW", "from-env")
    env_smtp = {**smtp_data, "password_file": None, "password_env": "SMTP_PW"}
    cfg = parse_config({**_base(), "notify": {**data, "smtp": env_smtp}})
    assert cfg.notify.smtp is not None and cfg.notify.smtp.password is not None
    assert cfg.notify.smtp.password.get_secret_value() == "from-env"

    with pytest.raises(ConfigError, match=r"notify: .*neither"):
        parse_config({**_base(), "notify": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"notify\.webhook_url"):
        parse_config({**_base(), "notify": {"webhook_url": "ftp://x"}})
    with pytest.raises(ConfigError, match=r"notify\.smtp\.to"):
        parse_config({**_base(), "notify": {**data, "smtp": {**smtp_data, "to": ["nobody"]}}})
    both = {**smtp_data, "starttls": True, "ssl": True}
    with pytest.raises(ConfigError, match=r"notify\.smtp\.ssl = True: starttls and ssl"):
        parse_config({**_base(), "notify": {**data, "smtp": both}})
    no_user = {**smtp_data, "username": None, "password_file": None, "password": "pw-s3cret"}
    with pytest.raises(ConfigError, match=r"notify\.smtp\.password: a password needs") as exc:
        parse_config({**_base(), "notify": {**data, "smtp": no_user}})
    assert "pw-s3cret" not in str(exc.value)
    missing = {**smtp_data, "password_file": str(tmp_path / "nope")}
    with pytest.raises(ConfigError, match=r"notify\.smtp\.password_file: .*cannot read"):
        parse_config({**_base(), "notify": {**data, "smtp": missing}})
