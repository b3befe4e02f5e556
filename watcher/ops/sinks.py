"""Where fate documents go: a webhook (an HTTP POST) and a command (the document on its stdin).

Each sink's ``send(body, timeout)`` delivers one body (a JSON document, or an array of them)
or raises ``DeliveryError`` with a message fit for a log line: never the token, never the
URL's credentials or query. ``sinks_from`` builds them from the ``[notify]`` settings, checking
at start (and on reload) what the schema cannot: that the token file reads and the command
exists; a ConfigError names the key.

The webhook uses urllib from the standard library: one POST with a timeout needs no more, and a
dependency would be one more thing to audit for a daemon that handles untrusted files. Redirects
are not followed (a redirect would carry the token to a host nobody configured): a 3xx is a
failed delivery like a 5xx. A proxy named by ``https_proxy``/``http_proxy`` is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from watcher import __version__
from watcher.errors import ConfigError

TOKEN_ENV = "WATCHER_NOTIFY_TOKEN"  # noqa: S105 - the variable's name, not a token
_STDERR_TAIL = 300  # characters of a failed command's stderr kept in the log line


class DeliveryError(Exception):
    """One try failed; the message says why, with no secret in it."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError: a failed try


def shown_url(url: str) -> str:
    """``url`` as a log line shows it: scheme, host, port and path (no credentials, no query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Webhook:
    name = "webhook"

    def __init__(self, url: str, headers: Sequence[str], token: str) -> None:
        self.url = url
        self.shown = shown_url(url)
        self._headers = {"Content-Type": "application/json",
                         "User-Agent": f"watcher/{__version__}"}
        for h in headers:
            key, _, value = h.partition(":")
            self._headers[key.strip()] = value.strip()
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._opener = urllib.request.build_opener(_NoRedirect)

    def send(self, body: bytes, timeout: float) -> None:
        # http(s) only: the schema refuses any other scheme
        req = urllib.request.Request(self.url, data=body, headers=self._headers,  # noqa: S310
                                     method="POST")
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                resp.read(65536)  # the answer is not used; reading it lets the server finish
        except urllib.error.HTTPError as exc:
            exc.close()
            raise DeliveryError(f"HTTP {exc.code} {exc.reason} from {self.shown}") from None
        except urllib.error.URLError as exc:
            raise DeliveryError(f"cannot reach {self.shown}: {_reason(exc.reason)}") from None
        except (TimeoutError, OSError) as exc:  # a read timed out, the connection reset
            raise DeliveryError(f"{self.shown}: {_reason(exc)}") from None


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class Command:
    """A command run with the body on its stdin, in a session of its own: past the timeout the
    whole group (children it started included) is killed."""

    name = "command"

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.shown = " ".join(self.argv)

    def send(self, body: bytes, timeout: float) -> None:
        try:
            proc = subprocess.Popen(  # noqa: S603 - the configured argv, no shell
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise DeliveryError(f"cannot run {self.argv[0]}: {exc.strerror or exc}") from None
        try:
            _, err = proc.communicate(body, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            raise DeliveryError(f"{self.argv[0]} timed out after {timeout:g} s and was "
                                "killed") from None
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            code = proc.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
            raise DeliveryError(f"{self.argv[0]} {how}" + (f": {tail}" if tail else ""))


Sink = Webhook | Command


def sinks_from(ns: Any, env: Mapping[str, str] | None = None) -> list[Sink]:
    """The sinks the ``[notify]`` settings ``ns`` configure (none: notifications are off)."""
    env = os.environ if env is None else env
    out: list[Sink] = []
    if ns.notify_url:
        out.append(Webhook(ns.notify_url, ns.notify_headers, _token(ns, env)))
    if ns.notify_command:
        argv0 = ns.notify_command[0]
        if not shutil.which(argv0):
            raise ConfigError("notify.notify_command", f"{argv0!r} is not an executable "
                              "file" + ("" if os.sep in argv0 else " on PATH"))
        out.append(Command(ns.notify_command))
    return out


def _token(ns: Any, env: Mapping[str, str]) -> str:
    if ns.notify_token_file:
        try:
            with open(ns.notify_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError("notify.notify_token_file",
                              f"cannot read {ns.notify_token_file}: {why}") from None
        where = "notify.notify_token_file"
    else:
        token = env.get(TOKEN_ENV, "").strip()
        where = TOKEN_ENV
    if any(ch in token for ch in "\r\n\0"):
        raise ConfigError(where, "the token must be one line")  # never the token itself
    return token
