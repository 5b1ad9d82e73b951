"""Configuration attacks and mistakes, on real processes: a config holding a password readable by
other users (warned at start-up, password never echoed); watched table names with SQL
metacharacters (rejected by config validation before anything connects); order mapping files
that try to inject SQL through identifiers or expressions (rejected at load, and the daemon's
order import refuses to run them against the ERP).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from replicator.errors import ConfigError
from replicator.mappers.orders import load_mapping
from replicator.orders.sample import SAMPLE_MAPPING
from tests.faults.common import TABLES, erp_connect, logged, seed_erp
from tests.faults.conftest import Row
from tests.helpers import ROOT, DaemonProcess, base_config, wait_until


@pytest.mark.fault("config-world-readable")
def test_world_readable_config_with_password_warns(
    erp_db: str, tmp_path: Path, fault_row: Row
) -> None:
    seed_erp(erp_db)
    info = psycopg.conninfo.conninfo_to_dict(erp_db)
    password = "s3cr3t-Fault-pw"  # trust auth on the test cluster: accepted and ignored
    url = f"postgresql://postgres:{password}@{info['host']}:{info['port']}/{info['dbname']}"
    cfg = base_config(tmp_path, url, f"sqlite:///{tmp_path / 's.db'}", TABLES)
    fault_row.injected = "config with a password in erp.dsn, mode 0644, then 0600"
    fault_row.how_often = "2 daemon starts"
    fault_row.checked = (
        "0644: `config_readable_by_others` warning with the mode; 0600: none; the "
        "password never appears in the output"
    )
    outputs = {}
    for mode in (0o644, 0o600):
        cfg.chmod(mode)
        with DaemonProcess(cfg, log=tmp_path / f"run-{mode:o}.log") as d:
            wait_until(logged(d, "streaming_started"), 60, what="streaming")
            assert d.terminate() == 0
            outputs[mode] = d.output()
    assert "config_readable_by_others" in outputs[0o644] and "0o644" in outputs[0o644]
    assert "config_readable_by_others" not in outputs[0o600]
    assert all(password not in out for out in outputs.values())
    fault_row.measured = "warning at 0644 only; password absent from both logs"


BAD_TABLES = [
    "public.items; DROP TABLE stock",
    'public."items"',
    "public.items--",
    "items' OR '1'='1",
    "public.it ems",
    "a.b.c",
    "public.items)",
]


@pytest.mark.fault("config-injection")
def test_table_names_with_sql_metacharacters_are_rejected(
    erp_db: str, tmp_path: Path, fault_row: Row
) -> None:
    seed_erp(erp_db)
    fault_row.injected = (
        f"{len(BAD_TABLES)} watched table names with SQL metacharacters "
        "(`;`, quotes, `--`, spaces, parentheses, 3 parts)"
    )
    fault_row.how_often = f"{len(BAD_TABLES)} x `check-config` and 1 x `run`"
    fault_row.checked = (
        "exit code ≠ 0 naming capture.tables; nothing created in the ERP (no publication)"
    )
    for i, name in enumerate(BAD_TABLES):
        cfg = base_config(tmp_path, erp_db, f"sqlite:///{tmp_path / 's.db'}", [name])
        res = subprocess.run(
            [sys.executable, str(ROOT / "sync_daemon.py"), "check-config", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode != 0, (name, res.stdout)
        assert "capture.tables" in res.stdout + res.stderr, (name, res.stdout + res.stderr)
        if i == 0:
            with DaemonProcess(cfg) as d:
                assert d.wait(30) != 0
    with erp_connect(erp_db) as c:
        assert c.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        assert c.execute("SELECT to_regclass('public.stock') IS NOT NULL").fetchone() == (True,)
    fault_row.measured = f"{len(BAD_TABLES)}/{len(BAD_TABLES)} rejected before connecting"


INJECTIONS = [
    ('table = "order_header"', 'table = "order_header; DROP TABLE items"'),
    ('e_number_column = "e_number"', 'e_number_column = "e_number\\" = e_number; --"'),
    (
        'order_number_column = "order_no"      # assigned',
        'order_number_column = "order_no) VALUES (1); DROP TABLE items; --"      # assigned',
    ),
    (
        'currency = "upper(order.currency)"',
        'currency = "upper(order.currency)); DROP TABLE items; --"',
    ),
    ("status = \"'open'\"", "status = \"'open'); DELETE FROM items; --\""),
    ('table = "number_series"', 'table = "number_series WHERE 1=1 --"'),
]


@pytest.mark.fault("config-injection")
def test_order_mapping_with_sql_injection_is_rejected_at_load(
    tmp_path: Path, fault_row: Row
) -> None:
    fault_row.injected = (
        "order mapping files with SQL in table/column names, in expressions and "
        "in a constant (`;`, quotes, `--`, `)`), 6 variants of the sample mapping"
    )
    fault_row.how_often = "6 files x 2 dialects (postgresql, mysql)"
    fault_row.checked = "`load_mapping` raises ConfigError naming the file for every variant"
    text = Path(SAMPLE_MAPPING).read_text()
    rejected = 0
    for case, (old, new) in enumerate(INJECTIONS):
        assert old in text, old
        path = tmp_path / f"orders-{case}.toml"
        path.write_text(text.replace(old, new, 1))
        for dialect in ("postgresql", "mysql"):
            with pytest.raises(ConfigError) as err:
                load_mapping(path, dialect)
            assert str(path) in str(err.value)
            rejected += 1
    fault_row.measured = f"{rejected}/{2 * len(INJECTIONS)} rejected at load"
