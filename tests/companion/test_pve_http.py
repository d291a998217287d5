"""The HTTPS session proxmoxer sends through (companion/pve_http.py), against a scripted TLS
server on 127.0.0.1: keep-alive reuse, a connection the server dropped, every way an answer is
framed, timeouts and refused input. The normal PVE exchanges (through proxmoxer) are covered
against the simulator in test_proxmox_sim.py."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from companion.proxmox import Connection, PveUnavailable, _Transport
from companion.pve_http import PveResponse, PveSession, Timeout, TlsFailure, TransportError
from companion.sim.tls import TlsMaterial, generate


@dataclass
class Server:
    port: int
    tls: TlsMaterial
    requests: list[str] = field(default_factory=list)  # request heads, in order
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    handlers: list[asyncio.Task[None]] = field(default_factory=list)
    sessions: list[PveSession] = field(default_factory=list)  # closed before the server stops

    def drop_idle(self) -> None:
        """Close every connection from the server's side (an idle keep-alive timing out)."""
        for writer in self.writers:
            writer.close()
        self.writers.clear()


def _answer(path: str) -> bytes | None:
    """What the server answers per path; None: answer nothing (the client must time out)."""
    json_body = b'{"data":"ok"}'
    if path == "/slow":
        return None
    if path == "/chunked":
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b'4;ext=1\r\n{"da\r\n9\r\nta":"ok"}\r\n0\r\nX-Trailer: 1\r\n\r\n'
        )
    if path == "/until-close":
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + json_body
    if path == "/close":
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 13\r\n\r\n" + json_body
    if path == "/continue":
        return (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n" + json_body
        )
    if path == "/no-content":
        return b"HTTP/1.1 204 No Content\r\n\r\n"
    if path == "/error":
        body = b'{"data":null}'
        return (
            b"HTTP/1.1 500 Configuration file 'nodes/pve/lxc/9.conf' does not exist\r\n"
            b"Content-Type: application/json;charset=UTF-8\r\nContent-Length: 13\r\n\r\n" + body
        )
    if path == "/truncated":
        return b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{"da'
    if path == "/garbage":
        return b"SSH-2.0-OpenSSH_9.2\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n" + json_body


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    tls = generate(tmp_path / "tls", "pve", ["127.0.0.1"])
    state = Server(port=0, tls=tls)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        state.handlers.append(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                text = head.decode("latin-1")
                state.requests.append(text)
                length = next(
                    (
                        int(line.split(":", 1)[1])
                        for line in text.split("\r\n")
                        if line.lower().startswith("content-length:")
                    ),
                    0,
                )
                if length:
                    await reader.readexactly(length)
                path = "/" + text.split(" ", 2)[1].split("?")[0].rsplit("/", 1)[1]
                answer = _answer(path)
                if answer is None:
                    await reader.read()  # say nothing until the client gives up
                    return
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or path == "/until-close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.server_context())
    state.port = srv.sockets[0].getsockname()[1]
    yield state
    for session in state.sessions:
        session.close()
    srv.close()
    state.drop_idle()
    await asyncio.wait_for(asyncio.gather(*state.handlers, return_exceptions=True), 5)


def _session(server: Server, *, fingerprint: str | None = None, timeout: float = 2.0) -> PveSession:
    session = PveSession(
        authorization="PVEAPIToken=ctrlable@pve!provisioner=s3cret",
        verify=False if fingerprint else str(server.tls.ca_file),
        fingerprint=fingerprint,
        timeout=timeout,
    )
    server.sessions.append(session)
    return session


def _get(session: PveSession, server: Server, path: str) -> PveResponse:
    return session.request("GET", f"https://127.0.0.1:{server.port}{path}")


async def test_one_connection_serves_many_requests(server: Server) -> None:
    session = _session(server)
    for _ in range(5):
        answer = await asyncio.to_thread(_get, session, server, "/api2/json/version")
        assert answer.status_code == 200
        assert answer.json() == {"data": "ok"}
    assert server.connections == session.connects == 1
    # the request carries the Host, the token, and asks for no compression
    assert f"Host: 127.0.0.1:{server.port}\r\n" in server.requests[0]
    assert "Authorization: PVEAPIToken=ctrlable@pve!provisioner=s3cret\r\n" in server.requests[0]
    assert "Accept-Encoding: identity\r\n" in server.requests[0]
    assert "s3cret" not in repr(session)


async def test_a_connection_the_server_dropped_is_replaced(server: Server) -> None:
    session = _session(server)
    assert (await asyncio.to_thread(_get, session, server, "/a")).status_code == 200
    server.drop_idle()
    await asyncio.sleep(0.05)  # the FIN arrives
    assert (await asyncio.to_thread(_get, session, server, "/b")).json() == {"data": "ok"}
    assert server.connections == 2
    assert len(server.requests) == 2  # nothing was sent on the dead connection


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/chunked", 200, b'{"data":"ok"}'),
        ("/until-close", 200, b'{"data":"ok"}'),
        ("/close", 200, b'{"data":"ok"}'),
        ("/continue", 200, b'{"data":"ok"}'),
        ("/no-content", 204, b""),
    ],
)
async def test_every_framing_is_read(server: Server, path: str, status: int, body: bytes) -> None:
    session = _session(server)
    answer = await asyncio.to_thread(_get, session, server, path)
    assert (answer.status_code, answer.content) == (status, body)
    # and the connection is still usable (or replaced when the server ended it)
    assert (await asyncio.to_thread(_get, session, server, "/after")).status_code == 200


async def test_pve_error_reason_reaches_proxmoxer(server: Server) -> None:
    session = _session(server)
    answer = await asyncio.to_thread(_get, session, server, "/error")
    assert answer.status_code == 500
    assert answer.reason == "Configuration file 'nodes/pve/lxc/9.conf' does not exist"
    assert answer.headers["content-type"] == "application/json;charset=UTF-8"
    assert answer.text == '{"data":null}'


@pytest.mark.parametrize("path", ["/truncated", "/garbage"])
async def test_a_broken_answer_is_a_transport_error(server: Server, path: str) -> None:
    session = _session(server)
    with pytest.raises(TransportError, match="connection to 127.0.0.1"):
        await asyncio.to_thread(_get, session, server, path)
    assert (await asyncio.to_thread(_get, session, server, "/after")).status_code == 200


async def test_query_and_form_encoding(server: Server) -> None:
    session = _session(server)
    base = f"https://127.0.0.1:{server.port}/api2/json/nodes/pve"
    data = {"newid": 101, "hostname": "a b", "full": 1}
    answer = await asyncio.to_thread(session.request, "POST", f"{base}/lxc/100/clone", data=data)
    assert answer.status_code == 200
    params = {"start": 0, "limit": 5000}
    await asyncio.to_thread(session.request, "GET", f"{base}/tasks/UPID:x/log", params=params)
    await asyncio.to_thread(session.request, "POST", f"{base}/lxc/101/status/start", data={})
    post, get, empty = server.requests
    assert post.startswith("POST /api2/json/nodes/pve/lxc/100/clone HTTP/1.1\r\n")
    assert "Content-Type: application/x-www-form-urlencoded\r\n" in post
    assert "Content-Length: 29\r\n" in post  # newid=101&hostname=a+b&full=1
    assert get.startswith("GET /api2/json/nodes/pve/tasks/UPID:x/log?start=0&limit=5000 HTTP")
    assert "Content-Length: 0\r\n" in empty


async def test_the_path_is_sent_encoded(server: Server) -> None:
    session = _session(server)
    base = f"https://127.0.0.1:{server.port}/api2/json/nodes"
    upid = "UPID:pve:00001234:0000ABCD:66A0B1C2:vzclone:9010:ctrlable@pve!provisioner:"
    await asyncio.to_thread(session.request, "GET", f"{base}/pve/tasks/{upid}/status")
    await asyncio.to_thread(session.request, "GET", f"{base}/a b\r\nX-Evil: 1/status")
    first, second = (head.split("\r\n", 1)[0] for head in server.requests)
    assert first == f"GET /api2/json/nodes/pve/tasks/{upid}/status HTTP/1.1"
    # urlsplit drops CR/LF/tab (WHATWG); what is left is percent-encoded: one request line
    assert second == "GET /api2/json/nodes/a%20bX-Evil:%201/status HTTP/1.1"


async def test_a_silent_server_is_a_timeout_naming_the_wait(server: Server) -> None:
    session = _session(server, timeout=0.3)
    with pytest.raises(Timeout, match="did not answer within 0.3 s"):
        await asyncio.to_thread(_get, session, server, "/slow")


async def test_header_injection_is_refused(server: Server) -> None:
    session = PveSession(authorization="PVEAPIToken=a@pve!t=x\r\nX-Evil: 1", verify=False)
    with pytest.raises(ValueError, match="invalid header"):
        await asyncio.to_thread(_get, session, server, "/x")
    assert server.requests == []


@pytest.mark.parametrize("trust", ["system store", "another CA"])
async def test_an_untrusted_certificate_fails_closed(
    server: Server, tmp_path: Path, trust: str
) -> None:
    other = generate(tmp_path / "other", "pve", ["127.0.0.1"])
    verify = True if trust == "system store" else str(other.ca_file)
    session = PveSession(authorization="PVEAPIToken=a@pve!t=x", verify=verify)
    with pytest.raises(TlsFailure, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(_get, session, server, "/secret")
    assert server.requests == []


async def test_pinned_fingerprint_is_checked_before_anything_is_sent(server: Server) -> None:
    good = _session(server, fingerprint=server.tls.fingerprint)
    assert (await asyncio.to_thread(_get, good, server, "/ok")).status_code == 200
    bad = _session(server, fingerprint="00" * 32)
    with pytest.raises(TlsFailure, match="Fingerprints did not match"):
        await asyncio.to_thread(_get, bad, server, "/secret")
    assert [r.split(" ")[1] for r in server.requests] == ["/ok"]


async def test_the_boundary_maps_a_timeout_to_unavailable(server: Server) -> None:
    connection = Connection.from_url(
        f"https://127.0.0.1:{server.port}",
        "ctrlable@pve!provisioner",
        "secret",
        ca_file=str(server.tls.ca_file),
        timeout=0.3,
    )
    transport = _Transport(connection)
    try:
        with pytest.raises(PveUnavailable, match="did not answer within 0.3 s"):
            await asyncio.to_thread(transport.call, "GET", "slow", None)
    finally:
        transport.close()
