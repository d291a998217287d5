"""A small asyncio client for the Home Assistant APIs the HAOS flow uses (REST + WebSocket).

Only what bringing up a fresh HA needs: onboarding (incl. the backup restore it offers), the
auth token endpoint and login flow, config flows, and WebSocket commands. Request bodies carry
credentials and are never logged; errors carry the path and status, never a body we sent.
Reference: home-assistant.md §7 (HA 2025.4 ``onboarding/views.py``, ``auth/__init__.py``,
``backup/http.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

SERVER_STATUSES = frozenset({502, 503, 504})


class HaError(Exception):
    """Home Assistant answered in a way the flow cannot use."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HaUnavailable(HaError):
    """No answer (connection refused/reset, timeout) or a gateway error: HA is not up (yet)."""


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str | None
    expires_in: int


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class HaClient:
    """One HA instance at ``base_url`` (``http://host:port``)."""

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> HaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        form: dict[str, str] | None = None,
        data: Any = None,
        params: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201),
        timeout: float | None = None,
    ) -> Any:
        """One request; returns the decoded JSON (or None for an empty body).

        Raises ``HaUnavailable`` for no answer or 502-504, ``HaError`` for other statuses
        not in ``ok`` (with ``code`` from a JSON ``{"code"}`` answer when there is one)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if json_body is not None:
            kwargs["json"] = json_body
        elif form is not None:
            kwargs["data"] = form
        elif data is not None:
            kwargs["data"] = data
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._session.request(method, self.base_url + path, **kwargs) as resp:
                text = await resp.text()
                status = resp.status
        except TimeoutError:
            raise HaUnavailable(f"{method} {path}: no answer in time") from None
        except aiohttp.ClientError as err:
            raise HaUnavailable(f"{method} {path}: {type(err).__name__}: {err}") from None
        body: Any = None
        if text:
            try:
                body = json.loads(text)
            except ValueError:
                body = text
        if status in SERVER_STATUSES:
            raise HaUnavailable(f"{method} {path}: HTTP {status}", status)
        if status not in ok:
            code = body.get("code") if isinstance(body, dict) else None
            message = body.get("message") if isinstance(body, dict) else body
            raise HaError(
                f"{method} {path}: HTTP {status}: {_short(str(message or ''))}",
                status,
                code if isinstance(code, str) else None,
            )
        return body

    # -- onboarding -------------------------------------------------------------------------

    async def onboarding(self) -> dict[str, bool]:
        """``{step: done}``; raises ``HaUnavailable`` unless HA core itself answers (HAOS's
        landing page during first boot does not serve this as a list of steps)."""
        body = await self.request("GET", "/api/onboarding")
        if not isinstance(body, list) or not all(isinstance(s, dict) and "step" in s for s in body):
            raise HaUnavailable("/api/onboarding: not Home Assistant core's answer (yet)")
        return {str(s["step"]): bool(s.get("done")) for s in body}

    async def installation_type(self) -> str | None:
        try:
            body = await self.request("GET", "/api/onboarding/installation_type")
        except HaError as err:
            if err.status == 401:  # onboarding already begun
                return None
            raise
        return str(body.get("installation_type")) if isinstance(body, dict) else None

    async def backup_info(self) -> dict[str, Any]:
        body = await self.request("GET", "/api/onboarding/backup/info")
        if not isinstance(body, dict):
            raise HaError("/api/onboarding/backup/info: not an object")
        return body

    async def upload_backup(self, path: Path, agent_id: str, *, timeout: float) -> str:
        """Multipart upload of one backup file; returns HA's backup id."""
        with path.open("rb") as handle:
            form = aiohttp.FormData()
            # A neutral file name: nothing of the site (let alone a credential) goes in it.
            form.add_field(
                "file", handle, filename="ctrlable-base.tar", content_type="application/x-tar"
            )
            body = await self.request(
                "POST",
                "/api/onboarding/backup/upload",
                params={"agent_id": agent_id},
                data=form,
                ok=(201,),
                timeout=timeout,
            )
        if not isinstance(body, dict) or not isinstance(body.get("backup_id"), str):
            raise HaError("backup upload: no backup_id in the answer")
        return str(body["backup_id"])

    async def restore(
        self,
        backup_id: str,
        agent_id: str,
        *,
        restore_addons: list[str] | None = None,
        restore_folders: list[str] | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "backup_id": backup_id,
            "agent_id": agent_id,
            "restore_database": False,
        }
        if restore_addons:
            body["restore_addons"] = restore_addons
        if restore_folders:
            body["restore_folders"] = restore_folders
        await self.request("POST", "/api/onboarding/backup/restore", json_body=body)

    async def create_owner(
        self, *, name: str, username: str, password: str, client_id: str, language: str
    ) -> str | None:
        """The onboarding user step; returns the auth code, or None if the step was done."""
        try:
            body = await self.request(
                "POST",
                "/api/onboarding/users",
                json_body={
                    "name": name,
                    "username": username,
                    "password": password,
                    "client_id": client_id,
                    "language": language,
                },
            )
        except HaError as err:
            if err.status == 403:
                return None
            raise
        if not isinstance(body, dict) or not isinstance(body.get("auth_code"), str):
            raise HaError("onboarding user step: no auth_code in the answer")
        return str(body["auth_code"])

    async def onboarding_step(self, step: str, token: str, body: Any = None) -> Any:
        """POST one of core_config / analytics / integration; None if it was done already."""
        try:
            return await self.request(
                "POST", f"/api/onboarding/{step}", token=token, json_body=body or {}
            )
        except HaError as err:
            if err.status == 403:
                return None
            raise

    # -- auth -------------------------------------------------------------------------------

    async def login(self, username: str, password: str, client_id: str, redirect_uri: str) -> str:
        """The login flow (``/auth/login_flow``) with the homeassistant provider: an auth code."""
        flow = await self.request(
            "POST",
            "/auth/login_flow",
            json_body={
                "client_id": client_id,
                "handler": ["homeassistant", None],
                "redirect_uri": redirect_uri,
            },
        )
        if not isinstance(flow, dict) or "flow_id" not in flow:
            raise HaError("login flow: no flow_id")
        result = await self.request(
            "POST",
            f"/auth/login_flow/{flow['flow_id']}",
            json_body={"client_id": client_id, "username": username, "password": password},
        )
        if isinstance(result, dict) and result.get("type") == "create_entry":
            return str(result["result"])
        errors = result.get("errors") if isinstance(result, dict) else None
        raise HaError(f"login refused: {errors or result!r}", code="invalid_auth")

    async def token_from_code(self, code: str, client_id: str) -> Tokens:
        body = await self.request(
            "POST",
            "/auth/token",
            form={"grant_type": "authorization_code", "code": code, "client_id": client_id},
        )
        return _tokens(body)

    async def refresh(self, refresh_token: str, client_id: str) -> Tokens:
        body = await self.request(
            "POST",
            "/auth/token",
            form={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": client_id,
            },
        )
        return _tokens(body, refresh_token)

    async def token_works(self, token: str) -> bool:
        try:
            await self.request("GET", "/api/", token=token)
        except HaError as err:
            if err.status in (401, 403):
                return False
            raise
        return True

    async def config(self, token: str) -> dict[str, Any]:
        body = await self.request("GET", "/api/config", token=token)
        if not isinstance(body, dict):
            raise HaError("/api/config: not an object")
        return body

    # -- config flows -----------------------------------------------------------------------

    async def start_flow(self, handler: str, token: str) -> dict[str, Any]:
        body = await self.request(
            "POST",
            "/api/config/config_entries/flow",
            token=token,
            json_body={"handler": handler, "show_advanced_options": False},
        )
        if not isinstance(body, dict):
            raise HaError("config flow: not an object")
        return body

    async def abort_flow(self, flow_id: str, token: str) -> None:
        """Abort a config flow in progress (gone already is fine)."""
        try:
            await self.request("DELETE", f"/api/config/config_entries/flow/{flow_id}", token=token)
        except HaError as err:
            if err.status != 404:
                raise

    async def flow_step(self, flow_id: str, data: dict[str, Any], token: str) -> dict[str, Any]:
        body = await self.request(
            "POST", f"/api/config/config_entries/flow/{flow_id}", token=token, json_body=data
        )
        if not isinstance(body, dict):
            raise HaError("config flow step: not an object")
        return body

    # -- WebSocket --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def websocket(self, token: str) -> AsyncIterator[WsConnection]:
        url = self.base_url.replace("http", "ws", 1) + "/api/websocket"
        try:
            ws = await self._session.ws_connect(url, heartbeat=30)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise HaUnavailable(f"websocket: {type(err).__name__}: {err}") from None
        try:
            conn = WsConnection(ws, self._timeout.total or 30.0)
            await conn.authenticate(token)
            yield conn
        finally:
            await ws.close()


class WsConnection:
    """An authenticated WebSocket API connection (commands answered in order)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
        self._ws = ws
        self._timeout = timeout
        self._next_id = 1

    async def _receive(self) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(self._ws.receive(), self._timeout)
        except TimeoutError:
            raise HaUnavailable("websocket: no answer in time") from None
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise HaUnavailable(f"websocket closed ({msg.type.name})")
        data = json.loads(msg.data)
        if not isinstance(data, dict):
            raise HaError("websocket: unexpected message")
        return data

    async def authenticate(self, token: str) -> None:
        hello = await self._receive()
        if hello.get("type") != "auth_required":
            raise HaError(f"websocket: expected auth_required, got {hello.get('type')!r}")
        await self._ws.send_json({"type": "auth", "access_token": token})
        answer = await self._receive()
        if answer.get("type") != "auth_ok":
            raise HaError("websocket: authentication refused", 401, "invalid_auth")

    async def call(self, type_: str, **data: Any) -> Any:
        msg_id = self._next_id
        self._next_id += 1
        await self._ws.send_json({"id": msg_id, "type": type_, **data})
        while True:
            answer = await self._receive()
            if answer.get("id") == msg_id and answer.get("type") == "result":
                break
        if not answer.get("success"):
            error = answer.get("error") or {}
            raise HaError(
                f"websocket {type_}: {error.get('code')}: {_short(str(error.get('message')))}",
                code=str(error.get("code")),
            )
        return answer.get("result")


def _tokens(body: Any, refresh_token: str | None = None) -> Tokens:
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise HaError("/auth/token: no access_token in the answer")
    return Tokens(
        access_token=str(body["access_token"]),
        refresh_token=str(body.get("refresh_token") or refresh_token or "") or None,
        expires_in=int(body.get("expires_in") or 1800),
    )
