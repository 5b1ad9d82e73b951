"""Configuration: the minimal file runs, errors name file/key/value, secrets stay out of output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.errors import ConfigError

MINIMAL = """
[erp]
dsn = "postgresql://sync@127.0.0.1:5432/erp"

[capture]
mode = "logical"
tables = ["public.items", "public.stock"]

[staging]
url = "sqlite:////var/lib/sync-daemon/staging.db"

[health]
listen = "127.0.0.1:8787"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    p.chmod(0o600)
    return p


def test_minimal_config_from_the_issue_is_valid(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.capture.tables == ("public.items", "public.stock")
    assert cfg.capture.heartbeat_interval == 10
    assert cfg.staging_url == "sqlite:////var/lib/sync-daemon/staging.db"
    assert cfg.health.port == 8787


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL.replace('mode = "logical"', 'mode = "logicl"'), "capture.mode = 'logicl'"),
        (MINIMAL.replace('"public.stock"', '"public.sto ck"'), "capture.tables"),
        (MINIMAL.replace("127.0.0.1:8787", "localhost"), "health.listen = 'localhost'"),
        (MINIMAL + "\n[daemon]\nnmae = 'x'\n", "daemon.nmae: unknown key"),
        (
            MINIMAL.replace('dsn = "postgresql://sync@127.0.0.1:5432/erp"', ""),
            "erp.dsn: required key is missing",
        ),
        (MINIMAL.replace("[capture]", "[capture]\nbatch_size = -5"), "capture.batch_size = -5"),
        ("[erp\n", "invalid TOML"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p.resolve()) in msg or str(p) in msg
    assert expected in msg


def test_password_from_env_and_file_and_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERP_PW", "s3cr3t-env")
    cfg = load_config(
        _write(tmp_path, MINIMAL.replace("[capture]", 'password_env = "ERP_PW"\n\n[capture]'))
    )
    assert cfg.erp.url == "postgresql://sync:s3cr3t-env@127.0.0.1:5432/erp"
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in cfg.erp.redacted
    (tmp_path / "pw").write_text("from-file\n")
    cfg = load_config(
        _write(
            tmp_path,
            MINIMAL.replace("[capture]", f'password_file = "{tmp_path / "pw"}"\n\n[capture]'),
        )
    )
    assert cfg.erp.url.startswith("postgresql://sync:from-file@")
    # systemd LoadCredential: relative names resolve in $CREDENTIALS_DIRECTORY
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(
        _write(tmp_path, MINIMAL.replace("[capture]", 'password_file = "pw"\n\n[capture]'))
    )
    assert ":from-file@" in cfg.erp.url
    monkeypatch.delenv("ERP_PW")
    with pytest.raises(ConfigError, match="ERP_PW"):
        load_config(
            _write(tmp_path, MINIMAL.replace("[capture]", 'password_env = "ERP_PW"\n\n[capture]'))
        )


def test_bad_dsn_error_does_not_echo_the_secret(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL.replace("postgresql://sync@", "oracle://sync:hunter2@"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "erp.dsn" in str(err.value) and "hunter2" not in str(err.value)


def test_check_config_cli(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL)
    ok = subprocess.run(
        [sys.executable, "sync_daemon.py", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = _write(tmp_path, MINIMAL.replace('mode = "logical"', 'mode = "x"'))
    res = subprocess.run(
        [sys.executable, "sync_daemon.py", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "capture.mode = 'x'" in res.stderr


def test_world_readable_config_with_password_warns(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL.replace("sync@", "sync:pw@"))
    p.chmod(0o644)
    res = subprocess.run(
        [sys.executable, "sync_daemon.py", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    assert "config_readable_by_others" in res.stderr + res.stdout
    assert ":pw@" not in res.stderr + res.stdout


def test_world_readable_config_with_a_shop_secret_warns_naming_the_key(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        MINIMAL + '\n[[shops]]\nname = "web"\nkind = "woocommerce"\n'
        'url = "http://127.0.0.1:1"\nconsumer_key = "ck_1"\nconsumer_secret = "cs_topsecret"\n',
    )
    p.chmod(0o644)
    res = subprocess.run(
        [sys.executable, "sync_daemon.py", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    out = res.stderr + res.stdout
    assert "config_readable_by_others" in out and "shops.0.consumer_secret" in out
    assert "cs_topsecret" not in out
    p.chmod(0o600)
    res = subprocess.run(
        [sys.executable, "sync_daemon.py", "check-config", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    assert "config_readable_by_others" not in res.stderr + res.stdout


def test_one_knob_for_the_order_schedule(tmp_path: Path) -> None:
    """``[schedules] orders`` decides; ``orders.interval`` alone still works (as every Ns, with a
    deprecation warning); both set: the schedule wins and a warning names both."""
    from structlog.testing import capture_logs

    base = MINIMAL.replace('url = "sqlite:////var/lib/sync-daemon/staging.db"', "")
    with capture_logs() as logs:
        cfg = load_config(_write(tmp_path, base + "\n[orders]\ninterval = 2\n"))
    assert cfg.schedules.orders == "every 2s"
    assert cfg.schedules.schedule("orders").interval.total_seconds() == 2  # type: ignore[union-attr]
    assert [x["event"] for x in logs] == ["config_orders_interval_deprecated"]
    both = base + '\n[orders]\ninterval = 2\n\n[schedules]\norders = "every 1m"\n'
    with capture_logs() as logs:
        cfg = load_config(_write(tmp_path, both))
    assert cfg.schedules.orders == "every 1m"
    assert [x["event"] for x in logs] == ["config_orders_interval_ignored"]
    with capture_logs() as logs:
        cfg = load_config(_write(tmp_path, base))
    assert cfg.schedules.orders == "*/5 * * * *" and not logs
