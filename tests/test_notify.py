"""Incident notifications against a real SMTP server (aiosmtpd) and a loopback webhook receiver."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import SecretStr
from structlog.testing import capture_logs

from replicator.config.ops import NotifySection, SmtpSection
from replicator.localpg import free_port
from replicator.notify import Notifier, WebhookTransport

T0 = 1_800_000_000.0


class Inbox:
    """aiosmtpd handler: keeps every message received, with its envelope recipients."""

    def __init__(self) -> None:
        self.mails: list[tuple[EmailMessage, list[str]]] = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.mails.append((mail, list(envelope.rcpt_tos)))
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:  # fmt: skip
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login.decode(), auth_data.password.decode()))
            return AuthResult(success=auth_data.password == b"mail-s3cret")
        return AuthResult(success=False)

    def body(self, i: int) -> str:
        return str(self.mails[i][0].get_content())

    @property
    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m, _ in self.mails]


class _Controller(Controller):
    """aiosmtpd on 127.0.0.1 port 0: the kernel picks a free port, read back after binding."""

    def _create_server(self) -> Any:
        async def create() -> Any:
            srv = await self.loop.create_server(
                self._factory_invoker, host=self.hostname, port=self.port
            )
            self.port = srv.sockets[0].getsockname()[1]
            return srv

        return create()


def _start_smtp(inbox: Inbox, port: int = 0, **kwargs: Any) -> Controller:
    ctl = _Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
    ctl.start()
    return ctl


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    box = Inbox()
    ctl = _start_smtp(box)
    try:
        yield box, ctl.port
    finally:
        ctl.stop()


def _cfg(port: int, **smtp: Any) -> NotifySection:
    return NotifySection(
        enabled=True,
        reminder_minutes=10,
        smtp=SmtpSection.model_validate(
            {
                "host": "127.0.0.1",
                "port": port,
                "starttls": False,
                "from": "sync@example.com",
                "to": ["ops@example.com", "owner@example.com"],
                "timeout": 5,
                **smtp,
            }
        ),
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_one_started_message_per_incident_then_recovered(inbox: tuple[Inbox, int]) -> None:
    box, port = inbox
    clock = Clock()
    n = Notifier(_cfg(port), name="sync-test", clock=clock)
    for i in range(40):  # forty failed orders of one shop within the window
        n.report("orders", "shop:demo", ok=False, message=f"E{1000 + i}: unknown SKU 'X-{i}'")
        clock.now += 1
    n.tick()
    assert box.subjects == ["[sync-test] FAILING orders/shop:demo: E1000: unknown SKU 'X-0'"]
    mail, rcpts = box.mails[0]
    assert rcpts == ["ops@example.com", "owner@example.com"]
    assert mail["From"] == "sync@example.com"
    assert mail["X-Sync-Daemon-Kind"] == "started"

    n.tick()  # nothing new: nothing sent
    assert len(box.mails) == 1
    [incident] = n.open_incidents()
    assert incident.failures == 40

    clock.now += 60
    n.report("orders", "shop:demo", ok=True)
    n.report("orders", "shop:demo", ok=True)  # already closed: no second recovered message
    n.tick()
    assert len(box.mails) == 2
    assert box.subjects[1] == "[sync-test] RECOVERED orders/shop:demo after 40 failures in 1 min"
    assert "40 failures" in box.body(1)
    assert n.open_incidents() == []


def test_reminder_digest_lists_what_still_fails(inbox: tuple[Inbox, int]) -> None:
    box, port = inbox
    clock = Clock()
    n = Notifier(_cfg(port), clock=clock)
    n.report("orders", "shop:a", ok=False, message="HTTP 503 from shop")
    n.report("capture", "erp", ok=False, message="connection refused")
    n.tick()
    assert len(box.mails) == 2  # two incidents, two started messages

    for _ in range(7):
        clock.now += 60
        n.report("orders", "shop:a", ok=False, message="HTTP 503 from shop")
        n.tick()
    assert len(box.mails) == 2  # 7 minutes: no reminder yet

    n.report("capture", "erp", ok=True)  # one recovers before the reminder
    clock.now += 4 * 60
    n.tick()
    assert [s.split(" ", 2)[1] for s in box.subjects] == [
        "FAILING",
        "FAILING",
        "RECOVERED",
        "STILL",
    ]
    reminder = box.body(3)
    assert box.subjects[3] == "[sync-daemon] STILL FAILING: 1 incident (orders/shop:a)"
    assert "8 failures in total, 7 since the last message" in reminder
    assert "capture / erp" not in reminder

    clock.now += 60
    n.tick()
    assert len(box.mails) == 4  # next reminder only after another 10 minutes
    clock.now += 10 * 60
    n.tick()
    assert len(box.mails) == 5
    assert "0 since the last message" in box.body(4)


def test_smtp_down_is_logged_and_retried_on_a_later_tick() -> None:
    port = free_port()  # nothing listens here yet
    clock = Clock()
    n = Notifier(_cfg(port), clock=clock)
    n.report("orders", "shop:a", ok=False, message="boom")
    with capture_logs() as logs:
        n.tick()  # must not raise
    assert n.pending() == 1
    assert any(e["event"] == "notify_send_failed" for e in logs)

    box = Inbox()
    ctl = _start_smtp(box, port=port)
    try:
        clock.now += 5
        n.tick()  # still backing off
        assert box.mails == []
        clock.now += 60
        n.tick()
        assert box.subjects == ["[sync-daemon] FAILING orders/shop:a: boom"]
        assert n.pending() == 0
    finally:
        ctl.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_login_and_no_secret_in_messages() -> None:
    box = Inbox()
    ctl = _start_smtp(
        box, authenticator=box.authenticate, auth_require_tls=False, auth_required=True
    )
    try:
        cfg = _cfg(ctl.port, username="sync", password="mail-s3cret")
        n = Notifier(cfg, clock=Clock())
        secret_msg = "connect postgresql://sync:erp-pw@db/erp failed password=erp-pw"
        n.report("capture", "erp", ok=False, message=secret_msg)
        n.tick()
    finally:
        ctl.stop()
    assert box.logins == [("sync", "mail-s3cret")]
    assert len(box.mails) == 1
    raw = box.mails[0][0].as_string() + box.body(0)
    assert "erp-pw" not in raw and "mail-s3cret" not in raw
    assert "postgresql://sync:***@db/erp" in box.body(0)


@pytest.fixture
def cert(tmp_path: Path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(crt), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(crt), str(key)


def test_starttls_login_with_verified_certificate(cert: tuple[str, str]) -> None:
    crt, key = cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, key)
    box = Inbox()
    # AUTH is only offered after STARTTLS (aiosmtpd's default): the login proves the upgrade.
    ctl = _start_smtp(
        box, tls_context=server_ctx, require_starttls=True, authenticator=box.authenticate
    )
    try:
        clock = Clock()
        smtp = {"starttls": True, "username": "sync", "password": "mail-s3cret"}
        untrusted = Notifier(_cfg(ctl.port, **smtp), clock=clock)
        untrusted.report("capture", "erp", ok=False, message="x")
        with capture_logs() as logs:
            untrusted.tick()  # self-signed and no ca_file: refused, not sent in clear
        assert untrusted.pending() == 1
        assert any("CERTIFICATE_VERIFY_FAILED" in str(e.get("error")) for e in logs)

        n = Notifier(_cfg(ctl.port, ca_file=crt, **smtp), clock=clock)
        n.report("capture", "erp", ok=False, message="connection refused")
        n.tick()
    finally:
        ctl.stop()
    assert box.logins == [("sync", "mail-s3cret")]
    assert box.subjects == ["[sync-daemon] FAILING capture/erp: connection refused"]


def test_disabled_tracks_but_sends_nothing(inbox: tuple[Inbox, int]) -> None:
    box, port = inbox
    cfg = _cfg(port).model_copy(update={"enabled": False})
    n = Notifier(cfg, clock=Clock())
    n.report("orders", "shop:a", ok=False, message="x")
    n.tick()
    assert box.mails == []
    assert [i.key for i in n.open_incidents()] == ["shop:a"]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    fail_next = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Hook.fail_next:
            _Hook.fail_next -= 1
            self.send_response(500)
        else:
            _Hook.received.append(json.loads(body))
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[str]:
    _Hook.received = []
    _Hook.fail_next = 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/hooks/T0KEN-SECRET"
    finally:
        srv.shutdown()
        srv.server_close()


def test_webhook_transport_posts_json_and_retries(hook: str) -> None:
    clock = Clock()
    cfg = NotifySection(enabled=True, webhook_url=SecretStr(hook))
    n = Notifier(cfg, name="sync-test", clock=clock)  # transports from the config
    _Hook.fail_next = 1
    n.report("orders", "shop:a", ok=False, message="HTTP 503 from shop")
    with capture_logs() as logs:
        n.tick()
    assert _Hook.received == []
    failed = [e for e in logs if e["event"] == "notify_send_failed"]
    assert failed and "500" in failed[0]["error"]
    assert "T0KEN-SECRET" not in repr(logs)

    n.report("orders", "shop:a", ok=False, message="again")
    clock.now += 60
    n.report("orders", "shop:a", ok=True)
    n.tick()
    assert [m["kind"] for m in _Hook.received] == ["started", "recovered"]
    started, recovered = _Hook.received
    assert started["daemon"] == "sync-test"
    assert started["incidents"][0]["key"] == "shop:a"
    assert started["incidents"][0]["first_message"] == "HTTP 503 from shop"
    assert recovered["incidents"][0]["failures"] == 2
    assert "T0KEN-SECRET" not in json.dumps(_Hook.received)


def test_unreachable_webhook_error_hides_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks/T0KEN-SECRET"
    n = Notifier(NotifySection(enabled=True, webhook_url=SecretStr(url)), clock=Clock())
    n.report("capture", "erp", ok=False, message="x")
    with capture_logs() as logs:
        n.tick()
    assert n.pending() == 1
    assert any(e["event"] == "notify_send_failed" for e in logs)
    assert "T0KEN-SECRET" not in repr(logs)
    assert WebhookTransport(url).name == "webhook"
