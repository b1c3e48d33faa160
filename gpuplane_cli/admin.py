"""`gpuplane admin tenants|keys|tokens|pricing` and `gpuplane whoami`: who may do what."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import admin_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli import pricing
from gpuplane_cli.client import EXIT_OK, Context, all_pages
from gpuplane_cli.output import print_json, print_key_secret, role_name, table, when

ROLES = {
    "admin": types_pb2.ROLE_ADMIN,
    "consumer": types_pb2.ROLE_CONSUMER,
    "provider": types_pb2.ROLE_PROVIDER,
}


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    a.add_leaf(subparsers, "whoami", whoami, "show who your API key acts as", common)
    admin = a.add_group(subparsers, "admin", "operate the marketplace: tenants, keys, tokens")

    tenants = a.add_group(admin, "tenants", "tenants (consumers and providers)")
    create = a.add_leaf(tenants, "create", create_tenant, "create a tenant", common)
    create.add_argument("name")
    create.add_argument("--weight", type=a.non_negative, default=0, help="fair-share weight")
    create.add_argument("--idempotency-key", default="")
    a.add_leaf(tenants, "list", list_tenants, "list tenants", common)

    keys = a.add_group(admin, "keys", "API keys")
    create = a.add_leaf(keys, "create", create_key, "create an API key (secret shown once)", common)
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=sorted(ROLES), required=True)
    create.add_argument("--description", default="")
    create.add_argument("--expires-in", type=a.duration, help="e.g. 30d; default never")
    create.add_argument("--idempotency-key", default="")
    listing = a.add_leaf(keys, "list", list_keys, "list API keys", common)
    listing.add_argument("--tenant", default="")
    listing.add_argument("--include-revoked", action="store_true")
    revoke = a.add_leaf(keys, "revoke", revoke_key, "revoke an API key", common)
    revoke.add_argument("key_id")

    tokens = a.add_group(admin, "tokens", "host registration tokens")
    create = a.add_leaf(tokens, "create", create_token, "mint a registration token", common)
    create.add_argument("--provider", default="", help="provider tenant (default: yours)")
    create.add_argument("--label", default="")
    create.add_argument("--ttl", type=a.duration, help="default 24h")
    create.add_argument("--max-uses", type=a.non_negative, default=0, help="0 = unlimited")
    create.add_argument("--idempotency-key", default="")
    listing = a.add_leaf(tokens, "list", list_tokens, "list registration tokens", common)
    listing.add_argument("--provider", default="")
    listing.add_argument("--include-inactive", action="store_true")
    revoke = a.add_leaf(tokens, "revoke", revoke_token, "revoke a registration token", common)
    revoke.add_argument("token_id")
    pricing.register(admin, common)


async def whoami(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    response = await client.call(client.admin.WhoAmI, admin_pb2.WhoAmIRequest())
    if ctx.json:
        print_json(response)
    else:
        role = role_name(response.role)
        print(f"tenant {response.tenant_id}, role {role}, principal {response.principal_id}")
    return EXIT_OK


async def create_tenant(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = admin_pb2.CreateTenantRequest(
        name=args.name, fair_share_weight=args.weight, idempotency_key=args.idempotency_key
    )
    tenant = (await client.call(client.admin.CreateTenant, request)).tenant
    if ctx.json:
        print_json(tenant)
    else:
        print(f"tenant {tenant.tenant_id} ({tenant.name})")
    return EXIT_OK


async def list_tenants(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.Tenant], str]:
        request = admin_pb2.ListTenantsRequest(page_size=size, page_token=token)
        response = await client.call(client.admin.ListTenants, request)
        return response.tenants, response.next_page_token

    tenants, _ = await all_pages(fetch)
    if ctx.json:
        print_json(tenants)
        return EXIT_OK
    rows = [(t.tenant_id, t.name, t.fair_share_weight, when(t.created_at)) for t in tenants]
    print(table(["TENANT", "NAME", "WEIGHT", "CREATED"], rows))
    return EXIT_OK


async def create_key(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = admin_pb2.CreateApiKeyRequest(
        tenant_id=args.tenant,
        role=ROLES[args.role],
        description=args.description,
        idempotency_key=args.idempotency_key,
    )
    if args.expires_in:
        expires = Timestamp()
        expires.FromDatetime(datetime.now(UTC) + timedelta(seconds=args.expires_in))
        request.expires_at.CopyFrom(expires)
    response = await client.call(client.admin.CreateApiKey, request)
    if ctx.json:
        print_json(response)
        return EXIT_OK
    key = response.key
    print(f"key {key.key_id} for tenant {key.tenant_id}, role {role_name(key.role)}")
    print_key_secret(response.secret)
    return EXIT_OK


async def list_keys(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.ApiKey], str]:
        request = admin_pb2.ListApiKeysRequest(
            tenant_id=args.tenant,
            include_revoked=args.include_revoked,
            page_size=size,
            page_token=token,
        )
        response = await client.call(client.admin.ListApiKeys, request)
        return response.keys, response.next_page_token

    keys, _ = await all_pages(fetch)
    if ctx.json:
        print_json(keys)
        return EXIT_OK
    rows = [
        (
            k.key_id,
            k.tenant_id,
            role_name(k.role),
            k.prefix + "…",
            when(k.created_at),
            when(k.last_used_at) or "never",
            f"revoked {when(k.revoked_at)}" if k.HasField("revoked_at") else when(k.expires_at),
            k.description,
        )
        for k in keys
    ]
    headers = ["KEY", "TENANT", "ROLE", "PREFIX", "CREATED", "LAST USED", "EXPIRES", "DESCRIPTION"]
    print(table(headers, rows))
    return EXIT_OK


async def revoke_key(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = admin_pb2.RevokeApiKeyRequest(key_id=args.key_id)
    key = (await client.call(client.admin.RevokeApiKey, request)).key
    if ctx.json:
        print_json(key)
    else:
        print(f"key {key.key_id} revoked at {when(key.revoked_at)}")
    return EXIT_OK


async def create_token(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = admin_pb2.CreateRegistrationTokenRequest(
        provider_tenant_id=args.provider,
        label=args.label,
        ttl_seconds=args.ttl or 0,
        max_uses=args.max_uses,
        idempotency_key=args.idempotency_key,
    )
    response = await client.call(client.admin.CreateRegistrationToken, request)
    if ctx.json:
        print_json(response)
        return EXIT_OK
    token = response.token
    expires = when(token.expires_at)
    print(f"token {token.token_id} for provider {token.provider_tenant_id}, expires {expires}")
    if response.secret:
        print(response.secret)
        print("(the token is shown only this once)", file=sys.stderr)
    return EXIT_OK


async def list_tokens(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.RegistrationToken], str]:
        request = admin_pb2.ListRegistrationTokensRequest(
            provider_tenant_id=args.provider,
            include_inactive=args.include_inactive,
            page_size=size,
            page_token=token,
        )
        response = await client.call(client.admin.ListRegistrationTokens, request)
        return response.tokens, response.next_page_token

    tokens, _ = await all_pages(fetch)
    if ctx.json:
        print_json(tokens)
        return EXIT_OK
    rows = [
        (
            t.token_id,
            t.provider_tenant_id,
            t.label,
            f"{t.uses}/{t.max_uses or '∞'}",
            when(t.created_at),
            f"revoked {when(t.revoked_at)}" if t.HasField("revoked_at") else when(t.expires_at),
        )
        for t in tokens
    ]
    print(table(["TOKEN", "PROVIDER", "LABEL", "USES", "CREATED", "EXPIRES"], rows))
    return EXIT_OK


async def revoke_token(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = admin_pb2.RevokeRegistrationTokenRequest(token_id=args.token_id)
    token = (await client.call(client.admin.RevokeRegistrationToken, request)).token
    if ctx.json:
        print_json(token)
    else:
        print(f"token {token.token_id} revoked at {when(token.revoked_at)}")
    return EXIT_OK
