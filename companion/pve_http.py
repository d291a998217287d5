"""The HTTPS transport under proxmoxer's ``requests`` session.

proxmoxer builds the URL, signs the request with the API token and parses PVE's answer; it
sends through a ``requests.Session``. This module is the ``requests`` transport adapter mounted
on that session (``Session.mount``, requests' documented extension point). It keeps ONE
keep-alive TLS connection per session (the boundary gives every worker thread its own session)
and speaks the small part of HTTP/1.1 that PVE's API uses, instead of urllib3's pool and
``http.client``'s e-mail-grade header parser: the same answers for a third of the CPU per
request (docs/proxmox.md, bench/bench_deploy.py).

What it speaks: one request at a time on the connection; answers framed by ``Content-Length``,
``Transfer-Encoding: chunked`` or the end of the connection; no body for ``HEAD``, 1xx, 204 and
304; ``Connection: close`` honoured; ``Accept-Encoding: identity`` (nothing here unzips). An idle
connection the other end closed is noticed before it is reused.

Trust is decided here too:
- ``verify=True``: the CA bundle requests uses (certifi) and the hostname;
- ``verify="/path"``: that CA file (or directory) and the hostname;
- a pinned SHA-256 fingerprint (with ``verify=False``): exactly that certificate, checked after
  the handshake, before anything is sent; a mismatch fails closed.

Errors come out as the ``requests`` exceptions the boundary already maps (``SSLError``,
``ConnectTimeout``, ``ReadTimeout``, ``ConnectionError``), with OpenSSL's or the socket's words
in the message (``CERTIFICATE_VERIFY_FAILED``, ``Connection refused``, ``Fingerprints did not
match``).
"""

from __future__ import annotations

import hashlib
import select
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import certifi
import requests
from requests.adapters import BaseAdapter
from requests.models import PreparedRequest, Response
from requests.structures import CaseInsensitiveDict

#: Methods a dropped keep-alive connection may resend once (nothing was done by the first try).
_RESENDABLE = frozenset({"GET", "HEAD"})
MAX_LINE = 65536
MAX_HEADERS = 100
MAX_BODY = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The other end did not speak HTTP/1.1 as expected (or closed mid-answer)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool


def _split_timeout(timeout: Any) -> tuple[float | None, float | None]:
    if isinstance(timeout, tuple):
        connect, read = timeout
        return connect, read
    return timeout, timeout


def _charset(content_type: str) -> str:
    """The charset a Content-Type names (PVE: ``application/json;charset=UTF-8``), else UTF-8."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip(' "'):
            return value.strip(' "')
    return "utf-8"


def _check_header(name: str, value: str) -> None:
    if any(c in name for c in "\r\n:") or any(c in value for c in "\r\n"):
        msg = f"invalid header {name!r}: no CR, LF (or ':' in the name) allowed"
        raise requests.exceptions.InvalidHeader(msg)


def _readline(rfile: BinaryIO) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        msg = "header line too long"
        raise ProtocolError(msg)
    if not line:
        msg = "the connection closed before the answer was complete"
        raise ProtocolError(msg)
    return line


def _read_exact(rfile: BinaryIO, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        msg = f"the connection closed after {len(data)} of {size} bytes"
        raise ProtocolError(msg)
    return data


def _read_chunked(rfile: BinaryIO) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_text = _readline(rfile).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            msg = f"bad chunk size {size_text[:20]!r}"
            raise ProtocolError(msg) from None
        if size == 0:
            while _readline(rfile) not in (b"\r\n", b"\n"):  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            msg = "answer body too large"
            raise ProtocolError(msg)
        parts.append(_read_exact(rfile, size))
        _readline(rfile)  # the CRLF after the chunk


def exchange(
    sock: socket.socket,
    rfile: BinaryIO,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes | None,
) -> Answer:
    """Send one request on ``sock`` and read its answer from ``rfile`` (the socket's buffered
    reader). Raises ``ProtocolError`` or ``OSError``; either leaves the connection unusable."""
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers.items():
        _check_header(name, value)
        lines.append(f"{name}: {value}")
    if body is not None and not any(n.lower() == "content-length" for n in headers):
        lines.append(f"Content-Length: {len(body)}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))

    while True:
        status_line = _readline(rfile).decode("latin-1").rstrip("\r\n")
        version, _, rest = status_line.partition(" ")
        code_text, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code_text.isdigit():
            msg = f"not an HTTP/1.x status line: {status_line[:80]!r}"
            raise ProtocolError(msg)
        status = int(code_text)
        answer_headers: list[tuple[str, str]] = []
        while True:
            line = _readline(rfile)
            if line in (b"\r\n", b"\n"):
                break
            if len(answer_headers) >= MAX_HEADERS:
                msg = "too many headers"
                raise ProtocolError(msg)
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                msg = f"bad header line {line[:80]!r}"
                raise ProtocolError(msg)
            answer_headers.append((name.strip(), value.strip()))
        if status >= 200 or status == 101:
            break  # 100 Continue and other 1xx: informational, the real answer follows

    fields = {name.lower(): value for name, value in answer_headers}
    tokens = {t.strip().lower() for t in fields.get("connection", "").split(",")}
    keep_alive = version == "HTTP/1.1" and "close" not in tokens
    if method == "HEAD" or status in (101, 204, 304):
        payload = b""
    elif "chunked" in fields.get("transfer-encoding", "").lower():
        payload = _read_chunked(rfile)
    elif "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError:
            msg = f"bad Content-Length {fields['content-length'][:20]!r}"
            raise ProtocolError(msg) from None
        if not 0 <= length <= MAX_BODY:
            msg = f"Content-Length {length} out of range"
            raise ProtocolError(msg)
        payload = _read_exact(rfile, length)
    else:
        payload = rfile.read(MAX_BODY + 1)  # framed by the end of the connection
        if len(payload) > MAX_BODY:
            msg = "answer body too large"
            raise ProtocolError(msg)
        keep_alive = False
    return Answer(status, reason, answer_headers, payload, keep_alive)


class _Connection:
    """One TLS connection and its buffered reader."""

    def __init__(self, sock: ssl.SSLSocket, key: tuple[str, int, Any]) -> None:
        self.sock = sock
        self.rfile: BinaryIO = sock.makefile("rb")
        self.key = key

    def dropped(self) -> bool:
        """True when the idle connection was closed by the other end (it is readable: EOF, or
        bytes nobody asked for)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


class PveHttpAdapter(BaseAdapter):
    """``requests`` transport: one keep-alive HTTPS connection, reused while it stays open."""

    def __init__(self, *, fingerprint: str | None = None) -> None:
        super().__init__()
        self._fingerprint = fingerprint.replace(":", "").lower() if fingerprint else None
        self._conn: _Connection | None = None
        self._contexts: dict[Any, ssl.SSLContext] = {}
        self.connects = 0  # TLS connections opened (tests: keep-alive is used)

    # -- TLS ----------------------------------------------------------------------------------

    def _context(self, verify: bool | str) -> ssl.SSLContext:
        context = self._contexts.get(verify)
        if context is not None:
            return context
        if self._fingerprint or verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif verify is True:
            context = ssl.create_default_context(cafile=certifi.where())
        else:
            try:
                context = ssl.create_default_context(cafile=verify)
            except (IsADirectoryError, ssl.SSLError):
                context = ssl.create_default_context(capath=verify)
            except FileNotFoundError:
                msg = f"Could not find the CA file: {verify}"
                raise requests.exceptions.SSLError(msg) from None
        self._contexts[verify] = context
        return context

    def _check_pin(self, sock: ssl.SSLSocket) -> None:
        if not self._fingerprint:
            return
        der = sock.getpeercert(binary_form=True)
        got = hashlib.sha256(der).hexdigest() if der else "none"
        if got != self._fingerprint:
            sock.close()
            msg = f"Fingerprints did not match. Expected {self._fingerprint}, got {got}."
            raise requests.exceptions.SSLError(msg)

    # -- connection ---------------------------------------------------------------------------

    def _connect(
        self, host: str, port: int, verify: bool | str, connect_timeout: float | None
    ) -> tuple[_Connection, bool]:
        """The open connection to ``host:port`` (reused: True) or a fresh one (False)."""
        key = (host, port, verify)
        conn = self._conn
        if conn is not None and conn.key == key and not conn.dropped():
            return conn, True
        self.close()
        context = self._context(verify)
        try:
            raw = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError:
            msg = f"connecting to {host}:{port} timed out ({connect_timeout} s)"
            raise requests.exceptions.ConnectTimeout(msg) from None
        except OSError as err:
            raise requests.exceptions.ConnectionError(
                f"cannot connect to {host}:{port}: {err.strerror or err}"
            ) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLError as err:
            raw.close()
            raise requests.exceptions.SSLError(str(err)) from None
        except TimeoutError:
            raw.close()
            msg = f"TLS handshake with {host}:{port} timed out ({connect_timeout} s)"
            raise requests.exceptions.ConnectTimeout(msg) from None
        except OSError as err:
            raw.close()
            raise requests.exceptions.ConnectionError(
                f"TLS handshake with {host}:{port} failed: {err}"
            ) from None
        self._check_pin(sock)
        self.connects += 1
        self._conn = _Connection(sock, key)
        return self._conn, False

    # -- BaseAdapter --------------------------------------------------------------------------

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: None | float | tuple[float, float] | tuple[float, None] = None,
        verify: bool | str = True,
        cert: None | bytes | str | tuple[bytes | str, bytes | str] = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        if cert is not None:
            msg = "client certificates are not supported by the PVE transport"
            raise ValueError(msg)
        url = urlsplit(request.url or "")
        if url.scheme != "https" or not url.hostname:
            msg = f"the PVE transport speaks https only, not {request.url!r}"
            raise requests.exceptions.InvalidURL(msg)
        method = request.method or "GET"
        body = request.body.encode() if isinstance(request.body, str) else request.body
        host, port = url.hostname, url.port or 443
        host_header = url.netloc.rpartition("@")[2]
        headers = {"Host": host_header, **request.headers, "Accept-Encoding": "identity"}
        connect_timeout, read_timeout = _split_timeout(timeout)
        for attempt in (1, 2):
            conn, reused = self._connect(host, port, verify, connect_timeout)
            try:
                conn.sock.settimeout(read_timeout)
                answer = exchange(conn.sock, conn.rfile, method, request.path_url, headers, body)
            except TimeoutError:
                self.close()
                msg = f"{host}:{port} did not answer within {read_timeout} s"
                raise requests.exceptions.ReadTimeout(msg) from None
            except (ProtocolError, OSError) as err:
                self.close()
                if reused and attempt == 1 and method in _RESENDABLE:
                    continue  # the keep-alive connection died under us: once more, fresh
                raise requests.exceptions.ConnectionError(
                    f"connection to {host}:{port} failed: {err}"
                ) from None
            if not answer.keep_alive:
                self.close()
            return self._response(request, answer)
        raise AssertionError("unreachable")  # pragma: no cover

    def _response(self, request: PreparedRequest, answer: Answer) -> Response:
        response = Response()
        response.status_code = answer.status
        response.reason = answer.reason
        response.headers = CaseInsensitiveDict(answer.headers)
        response.encoding = _charset(response.headers.get("content-type", ""))
        response._content = answer.body
        response._content_consumed = True  # type: ignore[attr-defined]
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
