"""The systemd unit: the directives operations relies on, and ``systemd-analyze verify``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "sync-daemon.service"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_the_operational_directives() -> None:
    d = _directives(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/sync-daemon run --config /etc/sync-daemon/config.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "RestartSec": "5",
        "WatchdogSec": "60",
        "TimeoutStopSec": "15",
        "User": "sync-daemon",
        "DynamicUser": "no",
        "StateDirectory": "sync-daemon",
        "LoadCredential": "erp-password:/etc/sync-daemon/erp-password",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert "#ReadWritePaths=" in UNIT.read_text()


def test_unit_is_hardened_and_documented() -> None:
    d = _directives(UNIT.read_text())
    for key, value in {
        "ProtectClock": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectHostname": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictRealtime": "yes",
        "RemoveIPC": "yes",
        "PrivateMounts": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "SystemCallErrorNumber": "EPERM",
    }.items():
        assert d.get(key) == [value], key
    assert d["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # Config errors, a source that needs a person and refused access are not restarted in a loop.
    assert d["RestartPreventExitStatus"] == ["2 3 4"]
    # Documentation= names a file the install steps put there.
    (doc,) = d["Documentation"]
    installed = doc.removeprefix("file://")
    ops = (UNIT.parent.parent / "docs" / "operations.md").read_text()
    assert f"docs/operations.md {installed}" in ops


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    unit = tmp_path / "sync-daemon.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sync-daemon", "/bin/true"))
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if "--offline" in proc.stderr:
        pytest.skip("systemd-analyze without --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert m is not None, proc.stdout[-500:] + proc.stderr
    assert float(m.group(1)) <= 1.5, proc.stdout[-2000:]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists; the installed path does not on a build machine.
    unit = tmp_path / "sync-daemon.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sync-daemon", "/bin/true"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sync-daemon.service" not in proc.stderr, proc.stderr
