"""The gateway's RouteTable on its own: routes by id, by (tenant, name) and by caller-key hash;
a partial update drops what a service no longer has (its keys, its name) without touching a
newer service that took its name."""

from __future__ import annotations

from controlplane.gateway.routes import Route, RouteTable


def route(sid: str, name: str = "web", keys: dict[str, str] | None = None) -> Route:
    return Route(sid, "ten_a", name, True, 8080, (("rep_1", "host_1"),), keys or {})


def test_lookups_and_full_replacement() -> None:
    table = RouteTable()
    table.replace({"svc_1": route("svc_1", keys={"h1": "skey_1"}), "svc_2": route("svc_2", "api")})
    assert len(table) == 2
    assert table.named("ten_a", "web") is table.get("svc_1")
    assert table.named("ten_b", "web") is None, "names are per tenant"
    assert table.keyed("h1") is table.get("svc_1")
    assert table.get("svc_1").replica_ids == ("rep_1",)  # type: ignore[union-attr]
    table.replace({"svc_2": route("svc_2", "api")})
    assert table.get("svc_1") is None
    assert table.named("ten_a", "web") is None
    assert table.keyed("h1") is None


def test_updates_drop_revoked_keys_and_deleted_services_but_not_a_new_namesake() -> None:
    table = RouteTable()
    table.replace({"svc_1": route("svc_1", keys={"h1": "skey_1", "h2": "skey_2"})})
    table.update({"svc_1"}, {"svc_1": route("svc_1", keys={"h2": "skey_2"})})
    assert table.keyed("h1") is None, "revoked"
    assert table.keyed("h2") is table.get("svc_1")

    # svc_1 deleted and a new "web" deployed: heard in either order, "web" is svc_2.
    table.update({"svc_2"}, {"svc_2": route("svc_2")})
    table.update({"svc_1"}, {})
    assert table.get("svc_1") is None
    assert table.keyed("h2") is None
    assert table.named("ten_a", "web") is table.get("svc_2")
    table.update({"svc_3"}, {})  # an id that never was: nothing changes
    assert len(table) == 1
