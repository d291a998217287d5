"""The HTTPS transport under proxmoxer's ``requests`` session.

proxmoxer builds the URL, signs the request with the API token and parses PVE's answer; it
sends through a ``requests.Session``. This module is the ``requests`` transport adapter mounted
on that session (``Session.mount``, requests' documented extension point): it keeps ONE
keep-alive ``http.client`` connection per session (the boundary gives every worker thread its
own session) instead of going through urllib3's connection pool. Same answers, a fifth of the
CPU per request (bench/bench_deploy.py, docs/proxmox.md).

Trust is decided here too:
- ``verify=True``: the CA bundle requests uses (certifi) and the hostname;
- ``verify="/path"``: that CA file (or directory) and the hostname;
- a pinned SHA-256 fingerprint (with ``verify=False``): exactly that certificate, checked after
  the handshake, before the request is sent; a mismatch fails closed.

Errors come out as the ``requests`` exceptions the boundary already maps (``SSLError``,
``ConnectTimeout``, ``ReadTimeout``, ``ConnectionError``), with OpenSSL's or the socket's words
in the message (``CERTIFICATE_VERIFY_FAILED``, ``Connection refused``, ``Fingerprints did not
match``).
"""

from __future__ import annotations

import hashlib
import http.client
import select
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter
from requests.models import PreparedRequest, Response
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

#: Methods a dropped keep-alive connection may resend once (nothing was done by the first try).
_RESENDABLE = frozenset({"GET", "HEAD"})


def _split_timeout(timeout: Any) -> tuple[float | None, float | None]:
    if isinstance(timeout, tuple):
        connect, read = timeout
        return connect, read
    return timeout, timeout


def _dropped(conn: http.client.HTTPSConnection) -> bool:
    """True when an idle keep-alive connection was closed by the other end (it is readable:
    EOF, or bytes nobody asked for)."""
    sock = conn.sock
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class PveHttpAdapter(BaseAdapter):
    """``requests`` transport: one keep-alive HTTPS connection, reused while it stays open."""

    def __init__(self, *, fingerprint: str | None = None) -> None:
        super().__init__()
        self._fingerprint = fingerprint.replace(":", "").lower() if fingerprint else None
        self._conn: http.client.HTTPSConnection | None = None
        self._conn_key: tuple[str, int, Any] | None = None
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
            context = ssl.create_default_context(cafile=requests.certs.where())
        elif isinstance(verify, str):
            try:
                context = ssl.create_default_context(cafile=verify)
            except (IsADirectoryError, ssl.SSLError):
                context = ssl.create_default_context(capath=verify)
            except FileNotFoundError:
                msg = f"Could not find the CA file: {verify}"
                raise requests.exceptions.SSLError(msg) from None
        else:
            msg = f"verify must be True, False or a CA path, got {verify!r}"
            raise ValueError(msg)
        self._contexts[verify] = context
        return context

    def _check_pin(self, conn: http.client.HTTPSConnection) -> None:
        if not self._fingerprint:
            return
        sock = conn.sock
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        got = hashlib.sha256(der).hexdigest() if der else "none"
        if got != self._fingerprint:
            conn.close()
            msg = f"Fingerprints did not match. Expected {self._fingerprint}, got {got}."
            raise requests.exceptions.SSLError(msg)

    # -- connection ---------------------------------------------------------------------------

    def _connection(
        self, host: str, port: int, verify: bool | str, connect_timeout: float | None
    ) -> tuple[http.client.HTTPSConnection, bool]:
        """The open connection to ``host:port`` (reused: True) or a fresh one (False)."""
        key = (host, port, verify)
        conn = self._conn
        if conn is not None and self._conn_key == key and not _dropped(conn):
            return conn, True
        self.close()
        conn = http.client.HTTPSConnection(
            host, port, timeout=connect_timeout, context=self._context(verify)
        )
        try:
            conn.connect()
        except ssl.SSLError as err:
            conn.close()
            raise requests.exceptions.SSLError(str(err)) from None
        except TimeoutError:
            conn.close()
            msg = f"connecting to {host}:{port} timed out ({connect_timeout} s)"
            raise requests.exceptions.ConnectTimeout(msg) from None
        except OSError as err:
            conn.close()
            raise requests.exceptions.ConnectionError(
                f"cannot connect to {host}:{port}: {err.strerror or err}"
            ) from None
        self._check_pin(conn)
        self.connects += 1
        self._conn, self._conn_key = conn, key
        return conn, False

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
        body = request.body
        if isinstance(body, str):
            body = body.encode()
        elif body is not None and not isinstance(body, bytes):
            msg = "the PVE transport sends bodies held in memory only"
            raise ValueError(msg)
        headers = dict(request.headers)
        headers["Accept-Encoding"] = "identity"  # nothing here decodes gzip
        connect_timeout, read_timeout = _split_timeout(timeout)
        host, port = url.hostname, url.port or 443
        for attempt in (1, 2):
            conn, reused = self._connection(host, port, verify, connect_timeout)
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(read_timeout)
                conn.request(method, request.path_url, body=body, headers=headers)
                answer = conn.getresponse()
                content = answer.read()
            except TimeoutError:
                self.close()
                msg = f"{host}:{port} did not answer within {read_timeout} s"
                raise requests.exceptions.ReadTimeout(msg) from None
            except (http.client.HTTPException, OSError) as err:
                self.close()
                if reused and attempt == 1 and method in _RESENDABLE:
                    continue  # the keep-alive connection died under us: once more, fresh
                raise requests.exceptions.ConnectionError(
                    f"connection to {host}:{port} failed: {err!r}"
                ) from None
            if answer.will_close:
                self.close()
            return self._response(request, answer, content)
        raise AssertionError("unreachable")  # pragma: no cover

    def _response(
        self, request: PreparedRequest, answer: http.client.HTTPResponse, content: bytes
    ) -> Response:
        response = Response()
        response.status_code = answer.status
        response.reason = answer.reason
        response.headers = CaseInsensitiveDict(answer.getheaders())
        response.encoding = get_encoding_from_headers(response.headers) or "utf-8"
        response._content = content
        response._content_consumed = True  # type: ignore[attr-defined]
        response.url = request.url or ""
        response.request = request
        response.connection = self
        return response

    def close(self) -> None:
        conn, self._conn, self._conn_key = self._conn, None, None
        if conn is not None:
            conn.close()

