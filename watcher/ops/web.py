"""The status page's routes, served by the daemon's HTTP server beside /metrics, /healthz and
/readyz (``metrics.MetricsServer``):

    GET  /                              the page (one HTML file with its script and style)
    GET  /status                        the status document (JSON), made once a second
    GET  /status/quarantine?page=N      a page of the quarantine (JSON), from the daemon's index
    GET  /files/output/FATE/N           output N of a recent fate (an image)
    GET  /files/quarantine/ID           a quarantined file's preview (an image)
    POST /quarantine/ID/requeue         move it back into the inbox
    POST /quarantine/ID/delete          remove it and its sidecar

Files are named by the daemon's own ids, never by a path: anything that is not a known id is a
404. With a token (``WATCHER_STATUS_TOKEN`` or ``status_token_file``; required on any address but
loopback) every request must carry it (``Authorization: Bearer``, or the cookie that
``/?token=...`` sets), compared in constant time. Without one, only a loopback Host is answered
(a page elsewhere that rebinds its name to 127.0.0.1 gets a 403). A POST must carry the page's
CSRF token in ``X-CSRF-Token`` (and a matching Origin, when the browser sends one): nothing
destructive is done by GET.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from watcher.errors import ConfigError
from watcher.ops.thumbs import Previews

COOKIE = "watcher_status_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_ID = r"([0-9]{1,12})"
_ROUTES = {
    "output": re.compile(rf"/files/output/{_ID}/([0-9]{{1,3}})"),
    "quarantined": re.compile(rf"/files/quarantine/{_ID}"),
    "action": re.compile(rf"/quarantine/{_ID}/(requeue|delete)"),
}

# (status code, body, content type, extra headers)
Reply = tuple[int, bytes, str, Mapping[str, str]]


class Steering(Protocol):
    """What the page may read and do, by id (``watch.statusview.Actions``)."""

    def page(self, number: int, reason: str = "") -> dict[str, Any]: ...
    def file(self, item_id: int) -> tuple[str, str] | None: ...
    def output(self, fate_id: int, index: int) -> tuple[str, str] | None: ...
    def requeue(self, item_id: int) -> dict[str, Any]: ...
    def delete(self, item_id: int) -> dict[str, Any]: ...


def is_loopback(host: str) -> bool:
    """Whether ``host`` needs no token: 127.0.0.1, ::1 or localhost (any other address,
    127.0.0.2 included, is another address)."""
    return host.strip("[]") in LOOPBACK_NAMES


def read_token(env: Mapping[str, str], token_file: str) -> str:
    """The token from ``WATCHER_STATUS_TOKEN``, else the first line of ``token_file``; ""
    when neither is given. A token file that cannot be read, or an empty token, is refused."""
    token = env.get("WATCHER_STATUS_TOKEN", "")
    if not token and token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            raise ConfigError("ops.status_token_file", f"cannot read {token_file}: "
                              f"{exc.strerror}") from exc
        if not token:
            raise ConfigError("ops.status_token_file", f"{token_file} holds no token")
    return token.strip()


def page_html() -> str:
    return resources.files("watcher.ops").joinpath("page.html").read_text(encoding="utf-8")


def _json(code: int, doc: Any) -> Reply:
    return code, json.dumps(doc).encode(), "application/json", {"Cache-Control": "no-store"}


def _text(code: int, text: str) -> Reply:
    return code, text.encode(), "text/plain; charset=utf-8", {}


@dataclass
class StatusApp:
    """The routes above; ``latest()`` gives the status document made by the daemon's loop."""

    latest: Callable[[], dict[str, Any]]
    steer: Steering
    token: str = ""
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    previews: Previews = field(default_factory=Previews)
    html: str = field(default_factory=page_html)

    def handle(self, method: str, target: str, headers: Mapping[str, str],
               body: bytes = b"") -> Reply | None:
        """The reply to one request, or None for a path that is not the page's (/metrics…)."""
        url = urlsplit(target)
        path, query = url.path, parse_qs(url.query)
        if self.token:
            if method == "GET" and path == "/" and "token" in query:
                return self._login(query["token"][0])
            if not self._authorized(headers):
                return _text(401, "a token is required: open /?token=TOKEN, or send "
                                  "'Authorization: Bearer TOKEN'\n")
        elif not is_loopback(_hostname(headers.get("Host", ""))):
            return _text(403, "this page answers to its loopback address only\n")
        if method == "POST":
            return self._post(path, headers)
        if method != "GET":
            return _text(405, "method not allowed\n")
        if path == "/":
            return self._page()
        if path == "/status":
            return _json(200, self.latest())
        if path == "/status/quarantine":
            number = query.get("page", ["1"])[0]
            reason = query.get("reason", [""])[0]
            return _json(200, self.steer.page(int(number) if number.isdigit() else 1, reason))
        return self._file(path)

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return hmac.compare_digest(auth[7:].encode(), self.token.encode())
        return hmac.compare_digest(_cookie(headers.get("Cookie", "")).encode(),
                                   self._cookie_value().encode())

    def _cookie_value(self) -> str:
        """What the cookie holds: made from the token (never the token itself, which may hold
        any character), the same for the daemon's run."""
        return hmac.new(self.token.encode(), b"watcher status cookie", "sha256").hexdigest()

    def _login(self, given: str) -> Reply:
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _text(401, "wrong token\n")
        return 303, b"", "text/plain", {
            "Location": "/",
            "Set-Cookie": f"{COOKIE}={self._cookie_value()}; HttpOnly; SameSite=Strict; Path=/"}

    def _page(self) -> Reply:
        nonce = secrets.token_urlsafe(16)
        html = self.html.replace("{{CSRF}}", self.csrf).replace("{{NONCE}}", nonce)
        return 200, html.encode(), "text/html; charset=utf-8", {
            "Content-Security-Policy": f"default-src 'self'; img-src 'self'; style-src "
                                       f"'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
                                       "frame-ancestors 'none'; form-action 'none'",
            "X-Frame-Options": "DENY", "Cache-Control": "no-store"}

    def _file(self, path: str) -> Reply | None:
        found: tuple[str, str] | None = None
        key: tuple[str, int, int] = ("", 0, 0)
        if m := _ROUTES["output"].fullmatch(path):
            key = ("output", int(m[1]), int(m[2]))
            found = self.steer.output(key[1], key[2])
        elif m := _ROUTES["quarantined"].fullmatch(path):
            key = ("quarantined", int(m[1]), 0)
            found = self.steer.file(key[1])
        elif path.startswith("/files/"):
            return _text(404, "not found\n")
        else:
            return None  # /metrics, /healthz, /readyz, or a 404 from there
        shown = self.previews.get(key, *found) if found is not None else None
        if shown is None:
            return _text(404, "not found\n")
        mime, data = shown
        return 200, data, mime, {"Cache-Control": "private, max-age=3600",
                                 "Content-Security-Policy": "default-src 'none'",
                                 "Content-Disposition": "inline"}

    def _post(self, path: str, headers: Mapping[str, str]) -> Reply:
        m = _ROUTES["action"].fullmatch(path)
        if m is None:
            return _text(404, "not found\n")
        given = headers.get("X-CSRF-Token", "")
        origin = headers.get("Origin", "")
        if not hmac.compare_digest(given.encode(), self.csrf.encode()) or \
                (origin and origin != f"http://{headers.get('Host', '')}"):
            return _text(403, "missing or wrong CSRF token\n")
        act = self.steer.requeue if m[2] == "requeue" else self.steer.delete
        try:
            return _json(200, act(int(m[1])))
        except ConfigError as exc:
            return _json(404, {"ok": False, "error": str(exc)})
        except OSError as exc:
            return _json(409, {"ok": False, "error": f"{exc.strerror or exc}"})


def _hostname(host: str) -> str:
    """The name in a Host header, without its port."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(header: str) -> str:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return ""


def check_bind(host: str, token: str) -> None:
    """Refuse to listen on another address than loopback without a token."""
    if not token and not is_loopback(host):
        raise ConfigError("ops.status_host", f"the status page on {host} needs a token: set "
                          "WATCHER_STATUS_TOKEN or ops.status_token_file (only 127.0.0.1, ::1 "
                          "and localhost go without)")
