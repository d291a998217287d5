"""The simulator's configuration and its in-process core (state, tokens, tasks, faults, log)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from companion.sim.faults import Faults, RequestLog
from companion.sim.model import ClusterState
from companion.sim.perms import CTRLABLE_ROLE, Acl, Token
from companion.sim.schema import Schema
from companion.sim.tasks import TaskManager


class PveError(Exception):
    """A PVE error response: ``message`` goes to the reason phrase; ``errors`` (400) to the body."""

    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


def die(message: str) -> PveError:
    """A handler ``die``: HTTP 500 with the text as reason phrase."""
    return PveError(500, message)


def param_error(errors: dict[str, str]) -> PveError:
    return PveError(400, "Parameter verification failed.", errors)


@dataclass
class SimConfig:
    """Everything tunable at start. Most fields stay live: change ``sim.config.<field>`` in a test.

    Times are seconds. Defaults suit tests (no auth delay, no lag); the CLI uses PVE-like values.
    """

    host: str = "127.0.0.1"
    port: int = 0
    token_user: str = "ctrlable@pve"  # noqa: S105 - a user id, not a secret
    token_name: str = "provisioner"  # noqa: S105 - a token name, not a secret
    token_secret: str | None = None  # None: a fresh UUID
    token_privileges: frozenset[str] = CTRLABLE_ROLE
    version: str = "8.3.2"
    repoid: str = "3e76eec21c4a14a7"
    task_seconds: float = 1.0  # default worker duration
    task_durations: dict[str, float] = field(default_factory=dict)  # per type: {"vzclone": 2.0}
    resources_lag: float = 0.0  # fresh guests show status "unknown" in /cluster/resources
    resources_status_lag: float = 0.0  # status changes reach /cluster/resources this much later
    auth_delay: float = 0.0  # real PVE: 3 s before every 401
    uniform_auth_error: bool = False  # 8.4.x (Jan 2026): every 401 reads "Authentication failed!"
    message_in_body: bool = False  # pve-http-server >= 5.2.0: {"data":null,"message":"...\n"}
    flock_timeout: float = 10.0  # config flock wait (config ops, start)
    clone_flock_timeout: float = 1.0  # qmclone worker's flock wait
    agent_ip: str | None = None  # address every guest reports (agent / CT interfaces) unless set
    seed: int | None = None  # RNG seed (MACs, error rates, numbers)
    cert_dir: Path | None = None  # where ca.pem/node.pem/node.key go; None: a temp dir
    state_file: Path | None = None  # load at start if present; save after changes and at stop
    tls: bool = True  # False serves plain HTTP (only for debugging; proxmoxer wants https)

    def __post_init__(self) -> None:
        for name in (
            "task_seconds",
            "resources_lag",
            "resources_status_lag",
            "auth_delay",
            "flock_timeout",
            "clone_flock_timeout",
        ):
            if getattr(self, name) < 0:
                msg = f"SimConfig.{name} must be >= 0, got {getattr(self, name)}"
                raise ValueError(msg)
        for task_type, seconds in self.task_durations.items():
            if seconds < 0:
                msg = f"SimConfig.task_durations[{task_type!r}] must be >= 0, got {seconds}"
                raise ValueError(msg)
        if not 0 <= self.port <= 65535:
            msg = f"SimConfig.port must be within 0..65535, got {self.port}"
            raise ValueError(msg)


class SimCore:
    """State + behaviour knobs, independent of HTTP. ``Simulator`` serves it."""

    def __init__(self, config: SimConfig, schema: Schema | None = None) -> None:
        self.config = config
        self.schema = schema or Schema.load()
        self.rng = random.Random(config.seed)
        self.state = ClusterState(rng=self.rng)
        self.faults = Faults(rng=random.Random(None if config.seed is None else config.seed + 1))
        self.request_log = RequestLog()
        self.fingerprint = ""  # the node certificate's SHA-256, set by the server once TLS is up
        token_kwargs: dict[str, Any] = {
            "userid": config.token_user,
            "name": config.token_name,
            "acls": [Acl("/", frozenset(config.token_privileges))],
        }
        if config.token_secret is not None:
            token_kwargs["secret"] = config.token_secret
        self.token = Token(**token_kwargs)
        self.tokens: dict[str, Token] = {self.token.full_id: self.token}
        self.tasks = TaskManager(
            self.faults,
            config.task_durations,
            lambda: self.config.task_seconds,
            self.state.alloc_pid,
            on_change=self.save_state,
        )
        if config.state_file is not None and config.state_file.exists():
            self.state.load_dict(json.loads(config.state_file.read_text("utf-8")))

    def add_token(
        self,
        userid: str,
        name: str,
        privileges: frozenset[str] | set[str] = CTRLABLE_ROLE,
        *,
        secret: str | None = None,
        path: str = "/",
    ) -> Token:
        """Register another API token (e.g. one with fewer privileges for a 403 test)."""
        kwargs: dict[str, Any] = {"userid": userid, "name": name}
        if secret is not None:
            kwargs["secret"] = secret
        token = Token(**kwargs)
        token.set_privileges(privileges, path)
        self.tokens[token.full_id] = token
        return token

    def set_task_duration(self, task_type: str, seconds: float) -> None:
        if seconds < 0:
            msg = f"task duration must be >= 0, got {seconds}"
            raise ValueError(msg)
        self.config.task_durations[task_type] = seconds

    def save_state(self) -> None:
        path = self.config.state_file
        if path is None:
            return
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state.to_dict(), indent=1, sort_keys=True), "utf-8")
        tmp.replace(path)
