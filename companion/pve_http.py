"""The HTTPS session proxmoxer sends through.

proxmoxer builds the URL and parses PVE's answer
(``ProxmoxResource._request``: ``session.request(method, url, data=, params=)``, then the
answer's ``status_code``, ``reason``, ``content`` and ``text``). The boundary gives proxmoxer this
session in place of its ``requests`` one (docs/proxmox.md): ONE keep-alive TLS connection per
session (every PVE worker thread has its own), the API token header, form-encoded bodies, and
the small part of HTTP/1.1 that PVE's API uses. A request costs a quarter of the CPU it costs
through ``requests`` + urllib3 (bench/bench_deploy.py), and none of requests' environment
(proxies, ``.netrc``, ``REQUESTS_CA_BUNDLE``) applies: PVE is reached directly.

What it speaks: one request at a time on the connection; answers framed by ``Content-Length``,
``Transfer-Encoding: chunked`` or the end of the connection; no body for ``HEAD``, 1xx, 204 and
304; ``Connection: close`` honoured; ``Accept-Encoding: identity`` (nothing here unzips). An idle
connection the other end closed is noticed before it is reused, and a GET that finds its
connection dead is sent once more on a fresh one.

Trust:
- ``verify=True``: the system CA store (OpenSSL's default paths) and the hostname;
- ``verify="/path"``: that CA file (or directory) and the hostname;
- a pinned SHA-256 fingerprint (with ``verify=False``): exactly that certificate, checked after
  the handshake, before anything is sent; a mismatch fails closed.

Failures raise ``TransportError`` (``TlsFailure``, ``Timeout``) with OpenSSL's or the socket's
words in the message (``CERTIFICATE_VERIFY_FAILED``, ``Connection refused``, ``Fingerprints did
not match``); the boundary maps them to its typed errors.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

from . import __version__

#: Methods a dropped keep-alive connection may resend once (nothing was done by the first try).
_RESENDABLE = frozenset({"GET", "HEAD"})
PATH_SAFE = "/:@!$&'()*+,;=-._~%"
MAX_LINE = 65536
MAX_HEADERS = 100
MAX_BODY = 64 * 1024 * 1024


class TransportError(Exception):
    """PVE could not be reached, or its answer could not be read."""


class TlsFailure(TransportError):
    """The TLS handshake failed, or the certificate is not the trusted / pinned one."""


class Timeout(TransportError):
    """Connecting, or waiting for the answer, took longer than the timeout."""


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
        raise ValueError(msg)


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

    def __init__(self, sock: ssl.SSLSocket, key: tuple[str, int]) -> None:
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


@dataclass(slots=True)
class PveResponse:
    """What proxmoxer reads of an answer."""

    status_code: int
    reason: str
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    @property
    def text(self) -> str:
        return self.content.decode(_charset(self.headers.get("content-type", "")), "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class PveSession:
    """proxmoxer's session: the token header, one keep-alive HTTPS connection, no environment.

    Not thread-safe: one per thread (the boundary makes one per PVE worker thread)."""

    def __init__(
        self,
        *,
        authorization: str,
        verify: bool | str = True,
        fingerprint: str | None = None,
        timeout: float | None = 10.0,
    ) -> None:
        self._authorization = authorization
        self._verify = verify
        self._fingerprint = fingerprint.replace(":", "").lower() if fingerprint else None
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None
        self._conn: _Connection | None = None
        self.connects = 0  # TLS connections opened (tests: keep-alive is used)

    def __repr__(self) -> str:  # the token never shows
        return f"PveSession(verify={self._verify!r}, pinned={self._fingerprint is not None})"

    # -- TLS ----------------------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        if self._context is not None:
            return self._context
        verify = self._verify
        if self._fingerprint or verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif verify is True:
            context = ssl.create_default_context()  # the system CA store
        else:
            try:
                context = ssl.create_default_context(cafile=verify)
            except (IsADirectoryError, ssl.SSLError):
                context = ssl.create_default_context(capath=verify)
            except FileNotFoundError:
                msg = f"Could not find the CA file: {verify}"
                raise TlsFailure(msg) from None
        self._context = context
        return context

    def _check_pin(self, sock: ssl.SSLSocket) -> None:
        if not self._fingerprint:
            return
        der = sock.getpeercert(binary_form=True)
        got = hashlib.sha256(der).hexdigest() if der else "none"
        if got != self._fingerprint:
            sock.close()
            msg = f"Fingerprints did not match. Expected {self._fingerprint}, got {got}."
            raise TlsFailure(msg)

    # -- connection ---------------------------------------------------------------------------

    def _connect(self, host: str, port: int) -> tuple[_Connection, bool]:
        """The open connection to ``host:port`` (reused: True) or a fresh one (False)."""
        key = (host, port)
        conn = self._conn
        if conn is not None and conn.key == key and not conn.dropped():
            return conn, True
        self.close()
        context = self._tls()
        try:
            raw = socket.create_connection((host, port), timeout=self._timeout)
        except TimeoutError:
            msg = f"connecting to {host}:{port} timed out ({self._timeout} s)"
            raise Timeout(msg) from None
        except OSError as err:
            msg = f"cannot connect to {host}:{port}: {err.strerror or err}"
            raise TransportError(msg) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLError as err:
            raw.close()
            raise TlsFailure(str(err)) from None
        except TimeoutError:
            raw.close()
            msg = f"TLS handshake with {host}:{port} timed out ({self._timeout} s)"
            raise Timeout(msg) from None
        except OSError as err:
            raw.close()
            msg = f"TLS handshake with {host}:{port} failed: {err}"
            raise TransportError(msg) from None
        self._check_pin(sock)
        self.connects += 1
        self._conn = _Connection(sock, key)
        return self._conn, False

    # -- what proxmoxer calls -----------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> PveResponse:
        """One request; ``params`` go in the query, ``data`` form-encoded in the body."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            msg = f"PVE is spoken to over https only, not {url!r}"
            raise ValueError(msg)
        # What RFC 3986 allows in a path stays (UPIDs carry ':', '@' and '!'); anything else
        # (a space, CR/LF, non-ASCII) is percent-encoded, never sent raw on the request line.
        target = quote(parts.path or "/", safe=PATH_SAFE)
        query = "&".join(q for q in (parts.query, urlencode(params or {}, doseq=True)) if q)
        if query:
            target += "?" + query
        headers = {
            "Host": parts.netloc.rpartition("@")[2],
            "User-Agent": f"ctrlable-companion/{__version__}",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "Authorization": self._authorization,
        }
        body = None
        if data:
            body = urlencode(data, doseq=True).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif method in ("POST", "PUT"):
            body = b""
        host, port = parts.hostname, parts.port or 443
        for attempt in (1, 2):
            conn, reused = self._connect(host, port)
            try:
                conn.sock.settimeout(self._timeout)
                answer = exchange(conn.sock, conn.rfile, method, target, headers, body)
            except TimeoutError:
                self.close()
                msg = f"{host}:{port} did not answer within {self._timeout} s"
                raise Timeout(msg) from None
            except (ProtocolError, OSError) as err:
                self.close()
                if reused and attempt == 1 and method in _RESENDABLE:
                    continue  # the keep-alive connection died under us: once more, fresh
                msg = f"connection to {host}:{port} failed: {err}"
                raise TransportError(msg) from None
            if not answer.keep_alive:
                self.close()
            return PveResponse(
                answer.status,
                answer.reason,
                answer.body,
                {name.lower(): value for name, value in answer.headers},
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
