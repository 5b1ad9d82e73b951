"""Cross-site request forgery protection for the Manage page's write actions.

A *signed double-submit cookie* (the OWASP variant that needs no server-side session store):

* the process holds a random secret (new on every start, never written anywhere);
* a browser gets a cookie ``sd_csrf = <nonce>.<HMAC-SHA256(secret, nonce)>`` — the nonce is the
  session's random value — ``HttpOnly; SameSite=Strict``;
* every form carries the same value in a hidden ``csrf_token`` field;
* a POST passes only when the field equals the cookie (double submit: a foreign site can make the
  browser *send* the cookie but cannot *read* it to put it in the form), the HMAC verifies with
  this process's secret (a cookie planted from a sibling sub-domain is useless), and the request
  is not cross-origin by its ``Origin`` (or, without one, ``Referer``) and ``Sec-Fetch-Site``
  headers compared with ``Host``.

After a daemon restart old cookies no longer verify: the next page load issues a new one and a
POST from a stale page is refused with "reload the page".
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

__all__ = ["COOKIE", "FIELD", "CsrfGuard"]

COOKIE = "sd_csrf"
FIELD = "csrf_token"


class CsrfGuard:
    """Issues and checks CSRF tokens with a per-process secret."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def new_token(self) -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, token: str | None) -> bool:
        """True when ``token`` was issued by this process."""
        if not token or token.count(".") != 1:
            return False
        nonce, mac = token.split(".")
        return bool(nonce) and hmac.compare_digest(mac.encode(), self._sign(nonce).encode())

    @staticmethod
    def cookie_value(headers: dict[str, str]) -> str | None:
        raw = headers.get("cookie")
        if not raw:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return None
        morsel = jar.get(COOKIE)
        return morsel.value if morsel is not None else None

    def token_for(self, headers: dict[str, str]) -> tuple[str, str | None]:
        """(token for the page's forms, ``Set-Cookie`` value or None when the cookie is fine)."""
        current = self.cookie_value(headers)
        if current is not None and self.valid(current):
            return current, None
        token = self.new_token()
        return token, f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"

    @staticmethod
    def same_origin(headers: dict[str, str]) -> bool:
        """False when the browser tells us the request comes from another origin."""
        host = headers.get("host", "").strip().lower()
        site = headers.get("sec-fetch-site", "").strip().lower()
        if site and site not in ("same-origin", "none"):
            return False
        origin = headers.get("origin")
        if origin is not None:
            if origin.strip().lower() == "null":
                return False
            return bool(host) and urlsplit(origin.strip()).netloc.lower() == host
        referer = headers.get("referer")
        if referer:
            return bool(host) and urlsplit(referer.strip()).netloc.lower() == host
        return True  # not a browser (curl, scripts): the token alone decides

    def check(self, headers: dict[str, str], submitted: str | None) -> str | None:
        """None when a POST may proceed, else the reason it is refused."""
        if not self.same_origin(headers):
            return "cross-origin request refused"
        cookie = self.cookie_value(headers)
        if not submitted:
            return "missing CSRF token; reload the page and try again"
        if cookie is None:
            return "missing CSRF cookie; reload the page and try again"
        if not hmac.compare_digest(submitted.encode(), cookie.encode()):
            return "CSRF token does not match; reload the page and try again"
        if not self.valid(cookie):
            return "CSRF token expired (the daemon restarted); reload the page and try again"
        return None
