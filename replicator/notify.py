"""Incident notifications by e-mail and webhook: one message per incident, not per failure.

An *incident* is identified by ``(service, key)`` — e.g. ``("orders", "shop:demo")`` for order
imports of one shop, ``("capture", "erp")`` for the replication stream. The daemon reports every
outcome with :meth:`Notifier.report`; the notifier turns that stream into few messages:

* the first failure of a ``(service, key)`` opens an incident → one **started** message;
* further failures only count (forty failed orders of one shop are one incident, "40 failures");
* while anything is open, a **reminder** digest every ``notify.reminder_minutes`` lists what is
  still failing, since when, and how many failures since the previous message;
* the first success of an open ``(service, key)`` closes it → one **recovered** message.

Report ``ok=True`` for a key when the thing as a whole is healthy again (e.g. at the end of an
order cycle of that shop without failures), not after each single good order; otherwise an
alternating good/bad order stream would open and close incidents at every order.

Nothing is sent from :meth:`Notifier.report`: messages go to a bounded per-transport outbox that
:meth:`Notifier.tick` delivers, so a slow mail server never stalls order processing mid-cycle. A
failed delivery is logged and retried on a later tick (with back-off), never raised. Message
texts pass :func:`replicator.log.redact`; the SMTP password and the webhook URL never appear in
a message or a log line.

Wiring (see ``replicator/runtime.py`` and ``replicator/cdc/supervisor.py``)::

    from replicator.notify import Notifier

    notifier = Notifier(cfg.notify, name=cfg.daemon.name)   # transports from the config
    ...
    notifier.report("orders", f"shop:{shop}", ok=False, message=f"{e_number}: {reason}")
    notifier.report("orders", f"shop:{shop}", ok=True)       # cycle of that shop went fine
    notifier.report("capture", "erp", ok=False, message="connection lost: ...")
    ...
    notifier.tick()                 # once per loop cycle: reminders and delivery
    notifier.open_incidents()       # for status / the Manage page

With ``notify.enabled = false`` incidents are still tracked (status shows them) but nothing is
sent. Tests pass ``transports=[...]`` and ``clock=`` to drive time.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Literal, Protocol

import httpx
import structlog

from replicator.config.ops import NotifySection, SmtpSection
from replicator.log import redact

log = structlog.get_logger(__name__)

__all__ = ["Incident", "Message", "Notifier", "SmtpTransport", "Transport", "WebhookTransport"]

Kind = Literal["started", "reminder", "recovered"]

_MAX_OUTBOX = 200  # per transport; beyond that the oldest undelivered message is dropped
_MAX_TEXT = 500  # a failure message is cut here: one bad payload must not make a 5 MB mail


@dataclass
class Incident:
    """One ongoing (or just closed) incident of a ``(service, key)``."""

    service: str
    key: str
    started: float
    first_message: str
    last_message: str
    failures: int = 1
    failures_since_notice: int = 1
    last_failure: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "key": self.key,
            "started": _iso(self.started),
            "last_failure": _iso(self.last_failure),
            "failures": self.failures,
            "failures_since_last_notice": self.failures_since_notice,
            "first_message": self.first_message,
            "last_message": self.last_message,
        }


@dataclass(frozen=True)
class Message:
    """One notification, rendered once and sent by every transport."""

    kind: Kind
    subject: str
    text: str
    incidents: tuple[dict[str, Any], ...]
    at: float

    def as_json(self, name: str) -> dict[str, Any]:
        return {
            "daemon": name,
            "host": socket.gethostname(),
            "kind": self.kind,
            "at": _iso(self.at),
            "subject": self.subject,
            "text": self.text,
            "incidents": list(self.incidents),
        }


class Transport(Protocol):
    """Delivers a message; raises on failure (the notifier retries later)."""

    name: str

    def send(self, message: Message, daemon_name: str) -> None: ...


class SmtpTransport:
    """E-mail through an SMTP server: implicit TLS, STARTTLS or plain (loopback relay)."""

    name = "smtp"

    def __init__(self, cfg: SmtpSection) -> None:
        self.cfg = cfg

    def send(self, message: Message, daemon_name: str) -> None:
        cfg = self.cfg
        mail = EmailMessage()
        mail["Subject"] = message.subject
        mail["From"] = cfg.sender
        mail["To"] = ", ".join(cfg.to)
        mail["Date"] = format_datetime(datetime.fromtimestamp(message.at, UTC))
        mail["Message-ID"] = make_msgid(domain=cfg.sender.rpartition("@")[2] or None)
        mail["X-Sync-Daemon-Kind"] = message.kind
        mail.set_content(message.text)
        # Certificates are always verified; a private CA goes in smtp.ca_file.
        context = ssl.create_default_context(cafile=cfg.ca_file)
        smtp: smtplib.SMTP
        if cfg.ssl:
            smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout, context=context)
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout)
        with smtp:
            if cfg.starttls and not cfg.ssl:
                smtp.starttls(context=context)
            if cfg.username and cfg.password is not None:
                smtp.login(cfg.username, cfg.password.get_secret_value())
            smtp.send_message(mail, from_addr=cfg.sender, to_addrs=list(cfg.to))


class WebhookTransport:
    """A JSON POST to a chat/incident webhook. The URL is a secret: never logged."""

    name = "webhook"

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self._url = url
        self.timeout = timeout

    def send(self, message: Message, daemon_name: str) -> None:
        try:
            resp = httpx.post(self._url, json=message.as_json(daemon_name), timeout=self.timeout)
        except httpx.HTTPError as exc:
            # httpx messages embed the URL; say only what kind of failure it was.
            raise ConnectionError(f"webhook: {type(exc).__name__}") from None
        if resp.status_code >= 300:
            raise ConnectionError(f"webhook answered HTTP {resp.status_code}")


@dataclass
class _Outbox:
    transport: Transport
    pending: deque[Message] = field(default_factory=lambda: deque(maxlen=_MAX_OUTBOX))
    next_attempt: float = 0.0
    backoff: float = 0.0
    dropped: int = 0


def transports_from_config(cfg: NotifySection) -> list[Transport]:
    out: list[Transport] = []
    if cfg.smtp is not None:
        out.append(SmtpTransport(cfg.smtp))
    if cfg.webhook_url is not None:
        out.append(WebhookTransport(cfg.webhook_url.get_secret_value(), cfg.webhook_timeout))
    return out


class Notifier:
    """Turns per-outcome reports into started / reminder / recovered messages."""

    # Back-off after a failed delivery: first retry on the next tick at least this much later.
    RETRY_MIN = 30.0
    RETRY_MAX = 600.0

    def __init__(
        self,
        cfg: NotifySection,
        transports: Sequence[Transport] | None = None,
        *,
        name: str = "sync-daemon",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.clock = clock
        self.reminder_seconds = cfg.reminder_minutes * 60
        chosen = transports_from_config(cfg) if transports is None else list(transports)
        self._outboxes = [_Outbox(t) for t in chosen] if cfg.enabled else []
        self._incidents: dict[tuple[str, str], Incident] = {}
        self._next_reminder: float | None = None
        # report() may come from worker threads (webhook receivers, pushers).
        self._lock = threading.Lock()

    # -- reporting ---------------------------------------------------------------------------

    def report(
        self, service: str, key: str, ok: bool, message: str = "", now: float | None = None
    ) -> None:
        """Record the outcome of one unit of work of ``(service, key)``. Never raises."""
        try:
            self._report(service, key, ok, message, self.clock() if now is None else now)
        except Exception as exc:  # notifications must never break the work they report on
            log.error("notify_report_failed", error=f"{type(exc).__name__}: {exc}")

    def _report(self, service: str, key: str, ok: bool, message: str, now: float) -> None:
        text = _clean(message)
        with self._lock:
            ident = (service, key)
            inc = self._incidents.get(ident)
            if ok:
                if inc is not None:
                    del self._incidents[ident]
                    self._enqueue(self._recovered(inc, now))
                    if not self._incidents:
                        self._next_reminder = None
                return
            if inc is None:
                inc = Incident(service, key, now, text, text, last_failure=now)
                self._incidents[ident] = inc
                inc.failures_since_notice = 0  # the started message covers this failure
                if self._next_reminder is None:
                    self._next_reminder = now + self.reminder_seconds
                self._enqueue(self._started(inc))
                log.warning("incident_started", service=service, key=key, message=text)
            else:
                inc.failures += 1
                inc.failures_since_notice += 1
                inc.last_message = text
                inc.last_failure = now

    def open_incidents(self) -> list[Incident]:
        with self._lock:
            return sorted(self._incidents.values(), key=lambda i: i.started)

    # -- the tick: reminders and delivery ------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Send a reminder when due, then deliver what is pending. Never raises."""
        t = self.clock() if now is None else now
        try:
            with self._lock:
                if self._incidents and self._next_reminder is not None and t >= self._next_reminder:
                    self._enqueue(self._reminder(t))
                    self._next_reminder = t + self.reminder_seconds
            self._deliver(t)
        except Exception as exc:
            log.error("notify_tick_failed", error=f"{type(exc).__name__}: {exc}")

    def pending(self) -> int:
        """Messages not yet delivered (summed over transports)."""
        return sum(len(o.pending) for o in self._outboxes)

    def _enqueue(self, msg: Message) -> None:
        for box in self._outboxes:
            if len(box.pending) == box.pending.maxlen:
                box.dropped += 1
            box.pending.append(msg)

    def _deliver(self, now: float) -> None:
        for box in self._outboxes:
            if not box.pending or now < box.next_attempt:
                continue
            while box.pending:
                msg = box.pending[0]
                try:
                    box.transport.send(msg, self.name)
                except Exception as exc:
                    box.backoff = min(self.RETRY_MAX, max(self.RETRY_MIN, box.backoff * 2))
                    box.next_attempt = now + box.backoff
                    log.warning(
                        "notify_send_failed",
                        transport=box.transport.name,
                        kind=msg.kind,
                        error=redact(f"{type(exc).__name__}: {exc}")[:300],
                        pending=len(box.pending),
                        retry_in_seconds=box.backoff,
                    )
                    break
                box.pending.popleft()
                box.backoff = 0.0
                box.next_attempt = 0.0
                log.info(
                    "notify_sent", transport=box.transport.name, kind=msg.kind, subject=msg.subject
                )

    # -- rendering -----------------------------------------------------------------------------

    def _prefix(self) -> str:
        return f"[{self.name}]"

    def _started(self, inc: Incident) -> Message:
        subject = f"{self._prefix()} FAILING {inc.service}/{inc.key}: {_short(inc.first_message)}"
        text = (
            f"{inc.service} / {inc.key} started failing at {_iso(inc.started)}.\n\n"
            f"Failure: {inc.first_message or '(no detail)'}\n\n"
            f"Further failures of {inc.service} / {inc.key} are counted, not mailed one by one; "
            f"a reminder follows every {_minutes(self.reminder_seconds)} while it lasts, and a "
            f"message when it recovers.\n\n{self._footer()}"
        )
        return Message("started", subject, text, (inc.as_dict(),), inc.started)

    def _recovered(self, inc: Incident, now: float) -> Message:
        n = inc.failures
        subject = (
            f"{self._prefix()} RECOVERED {inc.service}/{inc.key} after "
            f"{n} failure{'s' if n != 1 else ''} in {_duration(now - inc.started)}"
        )
        text = (
            f"{inc.service} / {inc.key} works again since {_iso(now)}.\n\n"
            f"Failing from {_iso(inc.started)} to {_iso(inc.last_failure)}, "
            f"{n} failure{'s' if n != 1 else ''}.\n"
            f"Last failure: {inc.last_message or '(no detail)'}\n\n{self._footer()}"
        )
        return Message("recovered", subject, text, (inc.as_dict(),), now)

    def _reminder(self, now: float) -> Message:
        incidents = sorted(self._incidents.values(), key=lambda i: i.started)
        count = len(incidents)
        subject = (
            f"{self._prefix()} STILL FAILING: {count} incident{'s' if count != 1 else ''} ("
            + ", ".join(f"{i.service}/{i.key}" for i in incidents[:5])
            + (", ..." if count > 5 else "")
            + ")"
        )
        lines = [f"Still failing at {_iso(now)}:", ""]
        dicts = []
        for inc in incidents:
            lines.append(
                f"- {inc.service} / {inc.key}: failing for {_duration(now - inc.started)}, "
                f"{inc.failures} failure{'s' if inc.failures != 1 else ''} in total, "
                f"{inc.failures_since_notice} since the last message\n"
                f"  last: {inc.last_message or '(no detail)'}"
            )
            dicts.append(inc.as_dict())
            inc.failures_since_notice = 0
        lines += ["", self._footer()]
        return Message("reminder", subject, "\n".join(lines), tuple(dicts), now)

    def _footer(self) -> str:
        return (
            f"-- \n{self.name} on {socket.gethostname()}. "
            "Details: `sync-daemon status` and `sync-daemon logs --level warning`."
        )


def _clean(message: str) -> str:
    text = redact(" ".join(str(message).split()))
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _minutes(seconds: float) -> str:
    m = seconds / 60
    return f"{m:g} minute{'s' if m != 1 else ''}"


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
