"""The provision plane and its routes: what each guest gets, and every attack refused."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from companion.errors import Conflict, NotFound
from companion.logs import setup_logging
from companion.provision import TokenBuckets
from companion.wiring import (
    WiringContext,
    WiringError,
    build_wiring,
    parse_tcp_coordinator,
    validate_overrides,
)

from .conftest import FIRSTBOOT_SECRET, Companion, make_settings
from .provision_helpers import (
    add_instance,
    complete,
    fetch,
    instance_state,
    mac_for,
    secret_values,
    stored_payload,
)

HEX32 = re.compile(r"^[0-9A-F]{32}$")
TOP_KEYS = {"version", "instance_id", "type", "hostname", "release", "wiring", "needs_binding"}
WIRING_KEYS = {
    "zigbee2mqtt": {"mqtt", "serial", "network"},
    "zwavejs": {
        "serial",
        "security_keys",
        "security_keys_long_range",
        "session_secret",
        "admin",
    },
    "frigate": {"mqtt"},
    "docker-portainer": {"portainer"},
    "freepbx": {"admin", "db_password"},
}
COORDINATOR = {"coordinator": "tcp://192.168.1.50:6638"}


# --------------------------------------------------------------------------------------------
# Payloads per type
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", sorted(WIRING_KEYS))
async def test_each_type_gets_only_its_wiring(companion: Companion, type_: str) -> None:
    services = companion.services
    await add_instance(services, "ctrlable-pro", "pro", mac_for(99), assign=False)
    overrides = COORDINATOR if type_ in ("zigbee2mqtt", "zwavejs") else {}
    iid = await add_instance(services, type_, f"{type_}-1", mac_for(1), overrides=overrides)
    status, body = await fetch(companion, f"{type_}-1", mac_for(1))
    assert status == 200, body
    assert set(body) == TOP_KEYS
    assert body["instance_id"] == iid
    assert body["type"] == type_
    assert body["hostname"] == f"{type_}-1"
    assert body["release"] == "2026.06"
    assert body["needs_binding"] == []
    assert set(body["wiring"]) == WIRING_KEYS[type_]
    wiring = body["wiring"]
    if type_ == "zigbee2mqtt":
        assert wiring["mqtt"]["server"] == "mqtt://pro:1883"
        assert wiring["mqtt"]["user"] == "ctrlable-zigbee2mqtt-1"
        assert len(wiring["mqtt"]["password"]) >= 24
        assert wiring["serial"] == {"port": "tcp://192.168.1.50:6638", "adapter": "zstack"}
        net = wiring["network"]
        assert len(net["network_key"]) == 16
        assert all(0 <= b <= 255 for b in net["network_key"])
        assert len(net["ext_pan_id"]) == 8
        assert 1 <= net["pan_id"] <= 0x3FFE
    elif type_ == "zwavejs":
        assert wiring["serial"] == {"port": "tcp://192.168.1.50:6638"}
        keys = list(wiring["security_keys"].values()) + list(
            wiring["security_keys_long_range"].values()
        )
        assert set(wiring["security_keys"]) == {
            "S0_Legacy",
            "S2_Unauthenticated",
            "S2_Authenticated",
            "S2_AccessControl",
        }
        assert set(wiring["security_keys_long_range"]) == {"S2_Authenticated", "S2_AccessControl"}
        assert all(HEX32.match(k) for k in keys)
        assert len(set(keys)) == len(keys)
        assert len(wiring["session_secret"]) >= 32
        assert wiring["admin"]["username"] == "admin"
    elif type_ == "frigate":
        mqtt = wiring["mqtt"]
        assert (mqtt["host"], mqtt["port"], mqtt["user"]) == ("pro", 1883, "ctrlable-frigate-1")
        assert set(mqtt) == {"host", "port", "user", "password"}
    elif type_ == "docker-portainer":
        assert wiring["portainer"]["username"] == "admin"
        assert len(wiring["portainer"]["password"]) >= 12  # Portainer's minimum
    else:
        assert len(wiring["admin"]["password"]) >= 16
        assert re.fullmatch(r"[A-Za-z0-9]{32}", wiring["db_password"])


@pytest.mark.parametrize("type_", sorted(WIRING_KEYS))
async def test_secrets_are_unique_per_instance(companion: Companion, type_: str) -> None:
    services = companion.services
    await add_instance(services, "ctrlable-pro", "pro", mac_for(99), assign=False)
    one = await add_instance(services, type_, "one", mac_for(1), overrides=COORDINATOR)
    two = await add_instance(services, type_, "two", mac_for(2), overrides=COORDINATOR)
    first = secret_values(await stored_payload(services, one))
    second = secret_values(await stored_payload(services, two))
    assert first
    assert len(first) == len(second)
    assert not set(first) & set(second)
    assert len(set(first)) == len(first)


async def test_usb_or_missing_coordinator_needs_binding(companion: Companion) -> None:
    services = companion.services
    usb = await add_instance(
        services, "zigbee2mqtt", "z-usb", mac_for(1), overrides={"coordinator": "usb"}
    )
    unset = await add_instance(services, "zwavejs", "zw-unset", mac_for(2))
    tcp = await add_instance(services, "zwavejs", "zw-tcp", mac_for(3), overrides=COORDINATOR)
    _, body = await fetch(companion, "z-usb", mac_for(1))
    assert body["wiring"]["serial"] is None
    assert "zigbee_coordinator" in body["needs_binding"]
    assert (await instance_state(services, usb))["needs_binding"] == 1
    _, body = await fetch(companion, "zw-unset", mac_for(2))
    assert body["wiring"]["serial"] is None
    assert body["needs_binding"] == ["zwave_coordinator"]
    assert (await instance_state(services, unset))["needs_binding"] == 1
    assert (await instance_state(services, tcp))["needs_binding"] == 0


async def test_mqtt_broker_resolution(
    companion_factory: Callable[..., Any], tmp_path: Path
) -> None:
    companion: Companion = await companion_factory(
        make_settings(tmp_path, mqtt_url="mqtt://broker.lan:1884")
    )
    services = companion.services
    # No ctrlable-pro in the project: the setting.
    iid = await add_instance(services, "frigate", "f1", mac_for(1), project="a")
    mqtt = (await stored_payload(services, iid))["guest"]["wiring"]["mqtt"]
    assert (mqtt["host"], mqtt["port"]) == ("broker.lan", 1884)
    # The project's ctrlable-pro wins over the setting.
    await add_instance(services, "ctrlable-pro", "pro-b", mac_for(90), project="b", assign=False)
    iid = await add_instance(services, "frigate", "f2", mac_for(2), project="b")
    mqtt = (await stored_payload(services, iid))["guest"]["wiring"]["mqtt"]
    assert mqtt["host"] == "pro-b"
    # An override wins over both, with a dealer-given login.
    iid = await add_instance(
        services,
        "zigbee2mqtt",
        "z3",
        mac_for(3),
        project="b",
        overrides={
            "mqtt_server": "mqtts://mq.example:8883",
            "mqtt_user": "dealer",
            "mqtt_password": "dealer-secret-1",
        },
    )
    mqtt = (await stored_payload(services, iid))["guest"]["wiring"]["mqtt"]
    assert mqtt["server"] == "mqtts://mq.example:8883"
    assert (mqtt["user"], mqtt["password"]) == ("dealer", "dealer-secret-1")


async def test_no_broker_needs_binding(companion: Companion) -> None:
    iid = await add_instance(companion.services, "frigate", "f1", mac_for(1))
    payload = await stored_payload(companion.services, iid)
    assert payload["guest"]["wiring"]["mqtt"] is None
    assert payload["guest"]["needs_binding"] == ["mqtt_broker"]


@pytest.mark.parametrize(
    ("type_", "overrides", "field"),
    [
        ("zigbee2mqtt", {"coordinator": "serial:///dev/ttyUSB0"}, "overrides.coordinator"),
        ("zigbee2mqtt", {"coordinator": "tcp://host"}, "overrides.coordinator"),
        ("zigbee2mqtt", {"coordinator": "tcp://bad_host:1"}, "overrides.coordinator"),
        ("zwavejs", {"coordinator": "tcp://1.2.3.4:70000"}, "overrides.coordinator"),
        ("zigbee2mqtt", {"adapter": "cc2531"}, "overrides.adapter"),
        ("zigbee2mqtt", {"channel": 27}, "overrides.channel"),
        ("zigbee2mqtt", {"mqtt_user": "u"}, "overrides.mqtt_password"),
        ("frigate", {"mqtt_server": "http://x:1"}, "overrides.mqtt_server"),
        ("frigate", {"mqtt_server": "mqtts://x:8883"}, "overrides.mqtt_server"),
        ("nope", {}, "type"),
    ],
)
def test_bad_overrides_name_the_field(type_: str, overrides: dict[str, Any], field: str) -> None:
    ctx = WiringContext(instance_id=1, type=type_, hostname="h", release="r", overrides=overrides)
    with pytest.raises(WiringError) as err:
        build_wiring(ctx)
    assert err.value.field == field


def test_overrides_of_the_deploy_plane_are_ignored_here() -> None:
    validate_overrides("zigbee2mqtt", {"ip": "dhcp", "vlan": 10, "coordinator": "usb"})
    assert parse_tcp_coordinator("TCP://[fe80::1]:6638".lower(), "c") == "tcp://[fe80::1]:6638"
    assert parse_tcp_coordinator(" USB ", "c") is None


# --------------------------------------------------------------------------------------------
# The routes: the happy path and every attack
# --------------------------------------------------------------------------------------------


async def test_fetch_then_complete_marks_active(companion: Companion) -> None:
    services = companion.services
    iid = await add_instance(services, "zwavejs", "zw1", mac_for(1), overrides=COORDINATOR)
    status, first = await fetch(companion, "zw1", mac_for(1).lower())  # MAC case-insensitive
    assert status == 200
    status, again = await fetch(companion, "ZW1", mac_for(1).replace(":", "-"))
    assert status == 200
    assert again == first  # the same client may fetch again until it completes
    status, body = await complete(companion, "zw1", mac_for(1), steps=["x"])
    assert status == 200, body
    assert body == {"instance_id": iid, "state": "active"}
    assert (await instance_state(services, iid))["state"] == "active"
    record = await services.provision.assignment_state(iid)
    assert record is not None
    assert record["state"] == "consumed"
    assert record["served_to"] == "127.0.0.1"
    row = await services.db.fetchone("SELECT report FROM assignments WHERE instance_id = ?", (iid,))
    assert row is not None
    report = json.loads(row["report"])
    assert report["steps"] == ["x"]
    assert report["needs_binding"] is False  # the companion's word, not the guest's
    assert "hostname" not in report


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Ctrlable-Secret": "wrong-secret-0123456789"}, {"X-Ctrlable-Secret": ""}],
    ids=["none", "wrong", "empty"],
)
async def test_missing_or_wrong_secret_is_401(
    companion: Companion, headers: dict[str, str]
) -> None:
    await add_instance(companion.services, "freepbx", "pbx", mac_for(1))
    for method, path, body in (
        ("GET", f"/api/provision/assignment?hostname=pbx&mac={mac_for(1)}", None),
        ("POST", "/api/provision/complete", {"hostname": "pbx", "mac": mac_for(1)}),
    ):
        status, answer = await companion.request(
            method, path, headers={"Authorization": "", **headers}, json=body
        )
        assert status == 401
        assert answer["error"]["code"] == "unauthorized"
    record = await companion.services.provision.assignment_state(1)
    assert record is not None
    assert record["state"] == "pending"


async def test_bearer_token_is_not_the_firstboot_secret(companion: Companion) -> None:
    await add_instance(companion.services, "freepbx", "pbx", mac_for(1))
    status, _ = await companion.request(
        "GET", f"/api/provision/assignment?hostname=pbx&mac={mac_for(1)}"
    )
    assert status == 401


async def test_secret_in_the_url_is_refused(companion: Companion) -> None:
    await add_instance(companion.services, "freepbx", "pbx", mac_for(1))
    # Only in the URL: not accepted as authentication.
    status, body = await fetch(
        companion, "pbx", mac_for(1), secret=None, extra_query=f"&secret={FIRSTBOOT_SECRET}"
    )
    assert status == 400
    assert body["error"]["details"][0]["field"] == "secret"
    # In the URL besides the header: refused too (it would end up in logs).
    status, body = await fetch(companion, "pbx", mac_for(1), extra_query="&secret=x")
    assert status == 400
    record = await companion.services.provision.assignment_state(1)
    assert record is not None
    assert record["state"] == "pending"


async def test_wrong_hostname_or_mac_is_the_same_404(companion: Companion) -> None:
    await add_instance(companion.services, "freepbx", "pbx", mac_for(1))
    await add_instance(companion.services, "freepbx", "pbx2", mac_for(2))
    answers = [
        await fetch(companion, "other", mac_for(1)),
        await fetch(companion, "pbx", mac_for(3)),
        await fetch(companion, "pbx", mac_for(2)),  # another guest's MAC
        await complete(companion, "pbx", mac_for(3)),
    ]
    for status, body in answers:
        assert status == 404
        assert body["error"]["code"] == "no_assignment"
    assert answers[0][1]["error"]["message"] == answers[1][1]["error"]["message"]


async def test_bad_query_names_the_field(companion: Companion) -> None:
    status, body = await fetch(companion, "pbx", "not-a-mac-address")
    assert status == 400
    assert body["error"]["details"][0]["field"] == "mac"
    status, body = await fetch(companion, "pbx_1", mac_for(1))
    assert status == 400
    assert body["error"]["details"][0]["field"] == "hostname"
    status, body = await companion.request(
        "GET",
        f"/api/provision/assignment?hostname=pbx&mac={mac_for(1)}&debug=1",
        headers={"X-Ctrlable-Secret": FIRSTBOOT_SECRET},
    )
    assert status == 400
    assert body["error"]["details"][0]["field"] == "debug"


async def test_replay_is_refused(companion: Companion) -> None:
    iid = await add_instance(companion.services, "frigate", "f1", mac_for(1))
    status, body = await complete(companion, "f1", mac_for(1))
    assert status == 409  # complete before fetch
    assert body["error"]["code"] == "not_served"
    assert (await fetch(companion, "f1", mac_for(1)))[0] == 200
    assert (await complete(companion, "f1", mac_for(1)))[0] == 200
    status, body = await complete(companion, "f1", mac_for(1))
    assert status == 409
    assert body["error"]["code"] == "already_completed"
    status, body = await fetch(companion, "f1", mac_for(1))
    assert status == 410
    assert body["error"]["code"] == "assignment_consumed"
    events = await companion.services.events.since(0)
    refused = [e for e in events if e.type == "provision.refused"]
    assert refused
    assert refused[-1].data["instance_id"] == iid


async def test_served_to_one_client_only(companion: Companion) -> None:
    services = companion.services
    await add_instance(services, "frigate", "f1", mac_for(1))
    plane = services.provision
    await plane.serve("f1", mac_for(1), "10.0.0.5")
    with pytest.raises(Conflict) as err:
        await plane.serve("f1", mac_for(1), "10.0.0.6")
    assert err.value.code == "served_elsewhere"

    async def never(instance_id: int, report: Any) -> None:
        raise AssertionError("must not complete")

    with pytest.raises(Conflict):
        await plane.complete("f1", mac_for(1), "10.0.0.6", {}, never)
    # Over HTTP (from 127.0.0.1) the guest is refused as well.
    status, body = await fetch(companion, "f1", mac_for(1))
    assert status == 409
    assert body["error"]["code"] == "served_elsewhere"


async def test_revoked_or_rolled_back_instance_gets_nothing(companion: Companion) -> None:
    services = companion.services
    one = await add_instance(services, "freepbx", "pbx1", mac_for(1))
    two = await add_instance(services, "freepbx", "pbx2", mac_for(2))
    await services.provision.revoke(one)
    assert (await fetch(companion, "pbx1", mac_for(1)))[0] == 404
    assert (await fetch(companion, "pbx2", mac_for(2)))[0] == 200
    await services.db.execute("UPDATE instances SET state = 'failed' WHERE id = ?", (two,))
    assert (await complete(companion, "pbx2", mac_for(2)))[0] == 404
    assert (await fetch(companion, "pbx2", mac_for(2)))[0] == 404


async def test_create_assignment_is_idempotent_and_rebinds_a_new_mac(companion: Companion) -> None:
    services = companion.services
    iid = await add_instance(services, "zwavejs", "zw", mac_for(1))
    before = await stored_payload(services, iid)
    await services.provision.create_assignment(iid, "zwavejs", "zw", mac_for(1).lower(), "p")
    assert await stored_payload(services, iid) == before  # resumed deploy: same secrets
    await services.provision.create_assignment(iid, "zwavejs", "zw", mac_for(2), "p")
    after = await stored_payload(services, iid)
    assert after != before
    rows = await services.db.fetchall(
        "SELECT mac, state FROM assignments WHERE instance_id = ? ORDER BY id", (iid,)
    )
    assert [(r["mac"], r["state"]) for r in rows] == [
        (mac_for(1), "revoked"),
        (mac_for(2), "pending"),
    ]
    assert (await fetch(companion, "zw", mac_for(1)))[0] == 404
    with pytest.raises(NotFound):
        await services.provision.create_assignment(999, "zwavejs", "zw", mac_for(1), "p")


async def test_report_size_is_bounded(companion: Companion) -> None:
    await add_instance(companion.services, "freepbx", "pbx", mac_for(1))
    assert (await fetch(companion, "pbx", mac_for(1)))[0] == 200
    status, body = await complete(companion, "pbx", mac_for(1), blob="x" * 70_000)
    assert status == 413
    assert (await complete(companion, "pbx", mac_for(1)))[0] == 200


async def test_completion_failure_lets_the_guest_retry(companion: Companion) -> None:
    services = companion.services
    iid = await add_instance(services, "freepbx", "pbx", mac_for(1))
    await services.provision.serve("pbx", mac_for(1), "127.0.0.1")
    calls: list[int] = []

    async def broken(instance_id: int, report: Any) -> None:
        calls.append(instance_id)
        raise RuntimeError("db went away")

    with pytest.raises(Exception, match="retry"):
        await services.provision.complete("pbx", mac_for(1), "127.0.0.1", {}, broken)
    record = await services.provision.assignment_state(iid)
    assert record is not None
    assert record["state"] == "served"
    assert (await complete(companion, "pbx", mac_for(1)))[0] == 200
    assert calls == [iid]


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------


async def test_failed_auth_counts_against_the_address(
    companion_factory: Callable[..., Any], tmp_path: Path
) -> None:
    companion: Companion = await companion_factory(make_settings(tmp_path, firstboot_rate_ip=5))
    await add_instance(companion.services, "freepbx", "pbx", mac_for(1))
    for _ in range(5):
        assert (await fetch(companion, "pbx", mac_for(1), secret="wrong-wrong-wrong"))[0] == 401
    # The right secret from the same address is now refused too, with a Retry-After.
    async with companion.session.get(
        f"{companion.url}/api/provision/assignment?hostname=pbx&mac={mac_for(1)}",
        headers={"X-Ctrlable-Secret": FIRSTBOOT_SECRET},
    ) as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"]["code"] == "rate_limited"


async def test_attempts_per_hostname_are_limited(
    companion_factory: Callable[..., Any], tmp_path: Path
) -> None:
    companion: Companion = await companion_factory(
        make_settings(tmp_path, firstboot_rate_ip=100, firstboot_rate_host=3)
    )
    await add_instance(companion.services, "freepbx", "pbx", mac_for(1))
    await add_instance(companion.services, "freepbx", "pbx2", mac_for(2))
    statuses = [(await fetch(companion, "pbx", mac_for(9)))[0] for _ in range(4)]
    assert statuses == [404, 404, 404, 429]
    # Wrong secrets do not lock a hostname out (only authenticated attempts count there).
    for _ in range(5):
        assert (await fetch(companion, "pbx2", mac_for(2), secret="wrong-wrong-wrong"))[0] == 401
    assert (await fetch(companion, "pbx2", mac_for(2)))[0] == 200


def test_token_bucket_refills() -> None:
    now = [0.0]
    buckets = TokenBuckets(2, 60.0, clock=lambda: now[0], max_keys=2)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == 0.0
    wait = buckets.take("a")
    assert wait == pytest.approx(30.0)
    now[0] += 30.0
    assert buckets.take("a") == 0.0
    buckets.take("b")
    buckets.take("c")  # "a" is dropped (bounded keys) and starts full again
    assert buckets.take("a") == 0.0


# --------------------------------------------------------------------------------------------
# Secrets never logged
# --------------------------------------------------------------------------------------------


async def test_secrets_never_reach_logs_or_events(
    companion: Companion, caplog: pytest.LogCaptureFixture
) -> None:
    # The companion's own logging set-up at DEBUG (it quiets loggers that print SQL parameters).
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiosqlite").level)
    setup_logging("DEBUG")
    root.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        await _full_flow_checking_logs(companion, caplog)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("aiosqlite").setLevel(saved[2])


async def _full_flow_checking_logs(companion: Companion, caplog: pytest.LogCaptureFixture) -> None:
    services = companion.services
    await add_instance(services, "ctrlable-pro", "pro", mac_for(99), assign=False)
    secrets_seen: list[str] = []
    for n, type_ in enumerate(sorted(WIRING_KEYS)):
        hostname = f"h{n}"
        iid = await add_instance(services, type_, hostname, mac_for(n), overrides=COORDINATOR)
        secrets_seen += secret_values(await stored_payload(services, iid))
        assert (await fetch(companion, hostname, mac_for(n)))[0] == 200
        assert (await fetch(companion, hostname, mac_for(n + 50)))[0] == 404
        assert (await complete(companion, hostname, mac_for(n)))[0] == 200
        assert (await complete(companion, hostname, mac_for(n)))[0] == 409
    assert len(secrets_seen) >= 15
    logged = caplog.text
    assert "assignment of instance" in logged  # the flow was logged...
    events = json.dumps([e.data for e in await services.events.since(0)])
    for value in [*secrets_seen, FIRSTBOOT_SECRET]:
        assert value not in logged  # ...without a secret
        assert value not in events


async def test_without_a_deploy_plane_complete_activates_the_instance(
    companion_factory: Callable[..., Any],
) -> None:
    def drop_deploy(services: Any) -> None:
        services.components.remove(services.deploy)
        del services.deploy

    companion: Companion = await companion_factory(None, drop_deploy)
    services = companion.services
    assert getattr(services, "deploy", None) is None
    iid = await add_instance(services, "zwavejs", "zw1", mac_for(1))
    assert (await fetch(companion, "zw1", mac_for(1)))[0] == 200
    status, body = await complete(companion, "zw1", mac_for(1))
    assert status == 200, body
    assert await instance_state(services, iid) == {"state": "active", "needs_binding": 1}
    events = [e for e in await services.events.since(0) if e.type == "instance.state"]
    assert events[-1].data["state"] == "active"
    assert events[-1].data["needs_binding"] is True
    # A completion the instance's owner refuses (no longer waiting) revokes the assignment.
    other = await add_instance(services, "zwavejs", "zw2", mac_for(2))
    await services.provision.serve("zw2", mac_for(2), "127.0.0.1")

    async def not_waiting(instance_id: int, report: Any) -> None:
        raise Conflict("instance is removed", code="not_waiting")

    with pytest.raises(Conflict):
        await services.provision.complete("zw2", mac_for(2), "127.0.0.1", {}, not_waiting)
    record = await services.provision.assignment_state(other)
    assert record is not None
    assert record["state"] == "revoked"
    assert (await fetch(companion, "zw2", mac_for(2)))[0] == 404
