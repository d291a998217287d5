"""The HTTPS server: PVE's request pipeline on ``/api2/json``, the control API on ``/_sim``, and the
``run_simulator`` / ``Simulator`` entry points for tests, benches and the CLI.

Pipeline per request (pve-http-server / pve-manager HTTPServer.pm order): injected latency and
errors, token auth (401, empty body), path/method lookup (501), duplicate URI parameters (400), the
operation's permission check (403), node resolution (500), schema validation (400), handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from companion.sim import handlers as _handlers
from companion.sim.core import PveError, SimConfig, SimCore
from companion.sim.faults import FaultRule, Faults, RequestLog, RequestRecord
from companion.sim.model import ClusterState, Guest, Kind
from companion.sim.perms import PermissionDenied, Token, check_operation
from companion.sim.schema import NotImplementedPath, ParamErrors
from companion.sim.seed import TemplateSpec, seed_default
from companion.sim.tasks import KillMode, Task, TaskManager
from companion.sim.tls import TlsMaterial, generate

_LOG = logging.getLogger(__name__)
SERVER_HEADER = "pve-api-daemon/3.0"
JSON_TYPE = "application/json;charset=UTF-8"
API_PREFIX = "/api2/json"
T = TypeVar("T")


class AuthFailure(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(message: str) -> str:
    """PVE puts the first line of the error in the status line."""
    line = message.strip().splitlines()[0] if message.strip() else "Internal Server Error"
    return line.encode("latin-1", "replace").decode("latin-1")


class Simulator:
    """A running (after :meth:`start`) PVE simulator. See ``docs/simulator.md``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.core = SimCore(self.config)
        self._runner: web.AppRunner | None = None
        self._tls: TlsMaterial | None = None
        self._tmpdir: Path | None = None
        self.port = 0
        self.host = self.config.host

    # -- conveniences for tests ----------------------------------------------------------------

    @property
    def state(self) -> ClusterState:
        return self.core.state

    @property
    def faults(self) -> Faults:
        return self.core.faults

    @property
    def tasks(self) -> TaskManager:
        return self.core.tasks

    @property
    def request_log(self) -> RequestLog:
        return self.core.request_log

    @property
    def token(self) -> Token:
        return self.core.token

    @property
    def token_id(self) -> str:
        """``user@realm!name`` (what PVE calls the full token id)."""
        return self.core.token.full_id

    @property
    def token_secret(self) -> str:
        return self.core.token.secret

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls else "http"

    @property
    def url(self) -> str:
        """Base URL including ``/api2/json``."""
        return f"{self.scheme}://{self.host}:{self.port}{API_PREFIX}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        if self._tls is None:
            msg = "simulator not started (or started without TLS)"
            raise RuntimeError(msg)
        return self._tls.ca_file

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the node certificate, ``AA:BB:...``."""
        if self._tls is None:
            msg = "simulator not started (or started without TLS)"
            raise RuntimeError(msg)
        return self._tls.fingerprint

    def auth_header(self, token: Token | None = None) -> dict[str, str]:
        tok = token or self.core.token
        return {"Authorization": f"PVEAPIToken={tok.full_id}={tok.secret}"}

    def proxmoxer_kwargs(self, token: Token | None = None) -> dict[str, Any]:
        """Keyword arguments for ``proxmoxer.ProxmoxAPI`` trusting the generated CA."""
        tok = token or self.core.token
        return {
            "host": f"{self.host}:{self.port}",
            "user": tok.userid,
            "token_name": tok.name,
            "token_value": tok.secret,
            "verify_ssl": str(self.ca_file) if self.config.tls else False,
            "backend": "https",
            "service": "PVE",
        }

    def info(self) -> dict[str, Any]:
        """What the CLI prints at start (the secret included: the caller owns this simulator)."""
        out: dict[str, Any] = {
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "token_id": self.token_id,
            "token_secret": self.token_secret,
            "nodes": sorted(self.state.nodes),
        }
        if self._tls is not None:
            out["fingerprint"] = self._tls.fingerprint
            out["ca_file"] = str(self._tls.ca_file)
        return out

    def seed_default(self, templates: list[TemplateSpec] | None = None) -> None:
        seed_default(self.state, templates)

    def add_token(self, userid: str, name: str, privileges: Any, **kwargs: Any) -> Token:
        return self.core.add_token(userid, name, privileges, **kwargs)

    async def kill_task(self, upid: str, mode: KillMode = "interrupt") -> Task:
        return await self.core.tasks.kill(upid, mode)

    async def wait_task(self, upid: str, timeout: float = 30.0) -> Task:
        return await self.core.tasks.wait(upid, timeout)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.tls:
            cert_dir = self.config.cert_dir
            if cert_dir is None:
                self._tmpdir = Path(tempfile.mkdtemp(prefix="ctrlable-pve-sim-"))
                cert_dir = self._tmpdir
            node = next(iter(self.state.nodes), "pve")
            self._tls = await asyncio.to_thread(generate, cert_dir, node, [self.config.host])
            self.core.fingerprint = self._tls.fingerprint
        app = build_app(self.core)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        ssl_ctx = self._tls.server_context() if self._tls else None
        site = web.TCPSite(
            self._runner,
            self.config.host,
            self.config.port,
            ssl_context=ssl_ctx,
            reuse_address=True,
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self.core.tasks.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.core.save_state()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


@contextlib.asynccontextmanager
async def run_simulator(
    config: SimConfig | None = None,
    *,
    seed: bool = True,
    templates: list[TemplateSpec] | None = None,
) -> AsyncIterator[Simulator]:
    """``async with run_simulator(SimConfig(task_seconds=0.05)) as sim:`` serves on 127.0.0.1,
    seeded (unless ``seed=False`` or a state file was loaded) with node ``pve``, storages
    ``local`` and ``local-lvm`` and the release templates (``templates`` or
    :data:`DEFAULT_TEMPLATES`)."""
    sim = Simulator(config)
    if seed and not sim.state.nodes:
        sim.seed_default(templates)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


class ThreadedSimulator:
    """A simulator on its own event loop thread, for synchronous code (benches, sync tests)."""

    def __init__(self, sim: Simulator, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self.sim = sim
        self.loop = loop
        self.thread = thread

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the simulator's loop thread (safe state access) and return its result."""

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(60)


@contextlib.contextmanager
def run_simulator_in_thread(
    config: SimConfig | None = None,
    *,
    seed: bool = True,
    templates: list[TemplateSpec] | None = None,
) -> Iterator[ThreadedSimulator]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pve-sim", daemon=True)
    thread.start()

    async def make() -> Simulator:
        sim = Simulator(config)
        if seed and not sim.state.nodes:
            sim.seed_default(templates)
        await sim.start()
        return sim

    sim = asyncio.run_coroutine_threadsafe(make(), loop).result(60)
    try:
        yield ThreadedSimulator(sim, loop, thread)
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ---------------------------------------------------------------------------------------------
# The PVE API pipeline


def _json_response(status: int, body: Any, reason: str | None = None) -> web.Response:
    return web.Response(
        status=status,
        reason=reason,
        body=json.dumps(body, separators=(",", ":")).encode(),
        headers={"Content-Type": JSON_TYPE},
    )


def error_response(
    core: SimCore, status: int, message: str, errors: dict[str, str] | None = None
) -> web.Response:
    body: dict[str, Any] = {"data": None}
    if errors is not None:
        body["errors"] = errors
    if core.config.message_in_body:
        body["message"] = message if message.endswith("\n") else message + "\n"
    return _json_response(status, body, _reason(message))


async def _read_params(request: web.Request) -> dict[str, Any]:
    params: dict[str, Any] = dict(parse_qsl(request.query_string, keep_blank_values=True))
    if request.method in ("POST", "PUT") and request.can_read_body:
        raw = await request.read()
        ctype = request.content_type
        if ctype == "application/json":
            try:
                body = json.loads(raw or b"{}")
            except ValueError as exc:
                raise PveError(400, f"malformed JSON string: {exc}") from None
            if not isinstance(body, dict):
                raise PveError(400, "malformed JSON string: expected an object")
            params.update(body)
        elif raw:
            params.update(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    return params


def _authenticate(core: SimCore, request: web.Request) -> Token:
    header = request.headers.get("Authorization", "")
    uniform = core.config.uniform_auth_error
    if not header.startswith("PVEAPIToken"):
        raise AuthFailure("No ticket")
    rest = header[len("PVEAPIToken") :]
    if not rest or rest[0] not in "= ":
        raise AuthFailure("No ticket")
    full_id, sep, secret = rest[1:].strip().partition("=")
    user, bang, name = full_id.partition("!")
    if not sep or not bang:
        raise AuthFailure("Authentication failed!" if uniform else "invalid token value!")
    token = core.tokens.get(full_id)
    if token is None:
        raise AuthFailure(
            "Authentication failed!" if uniform else f"no such token '{name}' for user '{user}'"
        )
    if token.expired:
        raise AuthFailure("Authentication failed!" if uniform else f"token '{name}' access expired")
    if not hmac.compare_digest(secret.encode(), token.secret.encode()):
        raise AuthFailure("Authentication failed!" if uniform else "invalid token value!")
    return token


def _redact(params: dict[str, Any]) -> dict[str, Any]:
    secret_keys = {"password", "cipassword", "token_value"}
    return {k: ("<redacted>" if k in secret_keys else v) for k, v in params.items()}


async def _api(core: SimCore, request: web.Request) -> web.StreamResponse:
    method = request.method
    rel = "/" + request.match_info.get("tail", "")
    rel = rel.rstrip("/") or "/"
    started = time.monotonic()
    wall = time.time()
    matched = core.schema.match(rel)
    template = matched[0] if matched else None
    params: dict[str, Any] = {}
    token: Token | None = None
    response: web.StreamResponse
    try:
        params = await _read_params(request)
        latency = core.faults.latency_for(method, rel, template)
        if latency > 0:
            await asyncio.sleep(latency)
        injected = core.faults.error_for(method, rel, template)
        if injected is not None:
            if injected.status == 401:
                raise AuthFailure(injected.message)
            raise PveError(injected.status, injected.message)
        token = _authenticate(core, request)
        op, uri_params = core.schema.lookup(method, rel)
        for key, value in params.items():
            if key in uri_params and str(value) != uri_params[key]:
                raise PveError(
                    400,
                    "Parameter verification failed.",
                    {key: "duplicate parameter (already defined in URI) with conflicting values!"},
                )
        merged = {**params, **uri_params}
        check_operation(token, op.permissions, merged)
        if op.proxyto:
            node_name = uri_params.get(op.proxyto) or params.get(op.proxyto)
            node = core.state.nodes.get(str(node_name))
            if node is None:
                raise PveError(
                    500,
                    f"hostname lookup '{node_name}' failed - failed to get address info for: "
                    f"{node_name}: Name or service not known",
                )
            if not node.online:
                raise PveError(595, "No route to host")
        typed = core.schema.validate(op, merged)
        handler = _handlers.HANDLERS[(method, op.path)]
        result = await handler(_handlers.Call(core, token, typed, op.path))
        if isinstance(result, _handlers.WithTotal):
            response = _json_response(200, {"data": result.data, "total": result.total})
        else:
            response = _json_response(200, {"data": result})
        if method != "GET":
            core.save_state()
    except AuthFailure as exc:
        if core.config.auth_delay > 0:
            await asyncio.sleep(core.config.auth_delay)
        response = web.Response(status=401, reason=_reason(exc.reason))
    except NotImplementedPath as exc:
        response = error_response(core, 501, exc.message)
    except PermissionDenied as exc:
        response = error_response(core, 403, exc.message)
    except ParamErrors as exc:
        response = error_response(core, 400, "Parameter verification failed.", exc.errors)
    except PveError as exc:
        response = error_response(core, exc.status, exc.message, exc.errors)
    except Exception as exc:
        _LOG.exception("simulator handler crashed on %s %s", method, rel)
        response = error_response(core, 500, f"internal simulator error: {exc}")
    core.request_log.append(
        RequestRecord(
            method=method,
            path=rel,
            params=_redact(params),
            status=response.status,
            time=wall,
            duration=time.monotonic() - started,
            endpoint=template,
            token=token.full_id if token else None,
            reason=response.reason,
        )
    )
    return response


# ---------------------------------------------------------------------------------------------
# Control API (/_sim): JSON in and out, authenticated with any registered API token.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaultBody(_Strict):
    endpoint: str = "*"
    method: str | None = None
    latency: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    fail_next: int = Field(0, ge=0)
    status: int = Field(500, ge=400, le=599)
    message: str = "simulated failure"


class TaskFaultBody(_Strict):
    type: str
    message: str
    count: int = 1


class TaskWarningsBody(_Strict):
    type: str
    warnings: int = Field(ge=0)


class KillBody(_Strict):
    mode: KillMode = "interrupt"


class GuestPatch(_Strict):
    agent_ip: str | None = None
    agent_running: bool | None = None
    ha_managed: bool | None = None
    ignores_shutdown: bool | None = None
    status: str | None = Field(None, pattern="^(running|stopped)$")


class GuestCreate(_Strict):
    kind: Kind
    vmid: int = Field(ge=100, le=999999999)
    node: str = "pve"
    name: str | None = None
    template: bool = False
    running: bool = False
    storage: str = "local-lvm"


class NodeCreate(_Strict):
    name: str
    online: bool = True


class NodePatch(_Strict):
    online: bool


class SettingsPatch(_Strict):
    task_seconds: float | None = Field(None, ge=0)
    resources_lag: float | None = Field(None, ge=0)
    resources_status_lag: float | None = Field(None, ge=0)
    auth_delay: float | None = Field(None, ge=0)
    flock_timeout: float | None = Field(None, ge=0)
    clone_flock_timeout: float | None = Field(None, ge=0)
    message_in_body: bool | None = None
    uniform_auth_error: bool | None = None
    agent_ip: str | None = None


M = TypeVar("M", bound=BaseModel)


class ControlError(Exception):
    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message


async def _body(request: web.Request, model: type[M]) -> M:
    try:
        raw = await request.json() if request.can_read_body else {}
    except ValueError:
        raise ControlError(400, "body", "not valid JSON") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        raise ControlError(400, field, err["msg"]) from None


def _guest(core: SimCore, vmid_text: str) -> Guest:
    try:
        vmid = int(vmid_text)
    except ValueError:
        raise ControlError(400, "vmid", f"not an integer: {vmid_text!r}") from None
    guest = core.state.guests.get(vmid)
    if guest is None:
        raise ControlError(404, "vmid", f"no guest {vmid}")
    return guest


async def _control(core: SimCore, request: web.Request) -> web.StreamResponse:
    try:
        _authenticate(core, request)
    except AuthFailure:
        return web.Response(status=401, reason="invalid token")
    path = request.match_info.get("tail", "").strip("/")
    parts = path.split("/") if path else []
    method = request.method
    try:
        result = await _control_dispatch(core, request, method, parts)
    except ControlError as exc:
        return web.json_response(
            {"error": {"field": exc.field, "message": exc.message}}, status=exc.status
        )
    except (ValueError, KeyError) as exc:
        return web.json_response({"error": {"field": "", "message": str(exc)}}, status=400)
    return web.json_response(result)


async def _control_dispatch(
    core: SimCore, request: web.Request, method: str, parts: list[str]
) -> Any:
    match (method, parts):
        case ("GET", ["state"]):
            return {
                **core.state.to_dict(),
                "tasks": [t.status_dict() for t in core.tasks.tasks.values()],
            }
        case ("GET", ["requests"]):
            return [r.as_dict() for r in core.request_log.records()]
        case ("DELETE", ["requests"]):
            core.request_log.clear()
            return {"cleared": True}
        case ("GET", ["faults"]):
            return {
                "rules": [asdict(r) for r in core.faults.rules],
                "task_faults": {
                    k: [asdict(f) for f in v] for k, v in core.faults.task_faults.items()
                },
                "task_warnings": core.faults.task_warnings,
                "task_durations": core.config.task_durations,
                "task_seconds": core.config.task_seconds,
            }
        case ("POST", ["faults"]):
            body = await _body(request, FaultBody)
            rule = core.faults.add(FaultRule(**body.model_dump()))
            return asdict(rule)
        case ("DELETE", ["faults"]):
            core.faults.clear()
            return {"cleared": True}
        case ("POST", ["task-faults"]):
            tf = await _body(request, TaskFaultBody)
            core.faults.fail_task(tf.type, tf.message, tf.count)
            return {"ok": True}
        case ("POST", ["task-warnings"]):
            tw = await _body(request, TaskWarningsBody)
            core.faults.warn_task(tw.type, tw.warnings)
            return {"ok": True}
        case ("PUT", ["task-durations"]):
            raw = await request.json()
            if not isinstance(raw, dict):
                raise ControlError(400, "body", "expected an object {type: seconds}")
            for key, value in raw.items():
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ControlError(400, key, "must be a number >= 0")
            for key, value in raw.items():
                if key == "default":
                    core.config.task_seconds = float(value)
                else:
                    core.set_task_duration(key, float(value))
            return {
                "task_seconds": core.config.task_seconds,
                "task_durations": core.config.task_durations,
            }
        case ("POST", ["tasks", upid, "kill"]):
            kb = await _body(request, KillBody)
            if upid not in core.tasks.tasks:
                raise ControlError(404, "upid", f"no such task {upid}")
            task = await core.tasks.kill(upid, kb.mode)
            return task.status_dict()
        case ("POST", ["guests"]):
            gc = await _body(request, GuestCreate)
            if gc.node not in core.state.nodes:
                raise ControlError(400, "node", f"unknown node {gc.node!r}")
            if gc.vmid in core.state.guests:
                raise ControlError(400, "vmid", f"vmid {gc.vmid} already exists")
            guest = core.state.add_guest(
                gc.kind, gc.vmid, gc.node, gc.name, template=gc.template, running=gc.running,
                storage=gc.storage,
            )  # fmt: skip
            core.save_state()
            return {"vmid": guest.vmid, "config": guest.config}
        case ("PATCH", ["guests", vmid_text]):
            guest = _guest(core, vmid_text)
            gp = await _body(request, GuestPatch)
            changes = gp.model_dump(exclude_unset=True)
            for key in ("agent_ip", "agent_running", "ha_managed", "ignores_shutdown"):
                if key in changes:
                    setattr(guest, key, changes[key])
            if changes.get("status") is not None:
                guest.set_status(changes["status"], core.state.alloc_pid())
            core.save_state()
            return {
                "vmid": guest.vmid,
                **{k: getattr(guest, k) for k in ("agent_ip", "ha_managed", "status")},
            }
        case ("POST", ["nodes"]):
            nc = await _body(request, NodeCreate)
            if nc.name in core.state.nodes:
                raise ControlError(400, "name", f"node {nc.name!r} already exists")
            core.state.add_node(nc.name, online=nc.online)
            core.save_state()
            return {"node": nc.name}
        case ("PATCH", ["nodes", name]):
            np_ = await _body(request, NodePatch)
            node = core.state.nodes.get(name)
            if node is None:
                raise ControlError(404, "name", f"no node {name!r}")
            node.online = np_.online
            return {"node": name, "online": node.online}
        case ("PATCH", ["settings"]):
            sp = await _body(request, SettingsPatch)
            for key, value in sp.model_dump(exclude_unset=True).items():
                setattr(core.config, key, value)
            return {k: getattr(core.config, k) for k in SettingsPatch.model_fields}
        case _:
            raise ControlError(404, "path", f"no control endpoint {method} /_sim/{'/'.join(parts)}")


@web.middleware
async def _server_header(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["Server"] = SERVER_HEADER
        raise
    response.headers["Server"] = SERVER_HEADER
    return response


def build_app(core: SimCore) -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)

    async def api(request: web.Request) -> web.StreamResponse:
        return await _api(core, request)

    async def control(request: web.Request) -> web.StreamResponse:
        return await _control(core, request)

    async def other_format(request: web.Request) -> web.StreamResponse:
        fmt = request.match_info["format"]
        rel = "/" + request.match_info.get("tail", "")
        return web.Response(status=501, reason=f"no formatter for uri {rel}, {fmt}")

    app.middlewares.append(_server_header)
    app.router.add_route("*", API_PREFIX + "/{tail:.*}", api)
    app.router.add_route("*", API_PREFIX, api)
    app.router.add_route("*", "/api2/{format}/{tail:.*}", other_format)
    app.router.add_route("*", "/_sim/{tail:.*}", control)
    return app
