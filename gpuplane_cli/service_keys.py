"""`gpuplane services keys create|list|revoke NAME`: a service's caller keys for the gateway."""

from __future__ import annotations

import argparse

from gpuplane.v1 import services_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, Context
from gpuplane_cli.output import print_json, print_key_secret, table, when


def register(group: a.Subparsers, common: argparse.ArgumentParser) -> None:
    keys = a.add_group(group, "keys", "a service's caller keys (reach only it, via the gateway)")
    create = a.add_leaf(
        keys, "create", create_key, "create a caller key (secret shown once)", common
    )
    create.add_argument("service", metavar="NAME")
    create.add_argument("--description", default="", help="what the key is for")
    create.add_argument(
        "--idempotency-key", default="", help="a retry with the same key makes no second key"
    )
    listing = a.add_leaf(keys, "list", list_keys, "list a service's caller keys", common)
    listing.add_argument("service", metavar="NAME")
    listing.add_argument("--include-revoked", action="store_true", help="revoked keys too")
    revoke = a.add_leaf(keys, "revoke", revoke_key, "revoke a caller key", common)
    revoke.add_argument("service", metavar="NAME")
    revoke.add_argument("key_id", metavar="KEY_ID")


async def create_key(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.CreateServiceKeyRequest(
        service=args.service, description=args.description, idempotency_key=args.idempotency_key
    )
    response = await client.call(client.services.CreateServiceKey, request)
    if ctx.json:
        print_json(response)
        return EXIT_OK
    print(f"caller key {response.key.key_id} for service {args.service}")
    print_key_secret(response.secret)
    return EXIT_OK


async def list_keys(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.ListServiceKeysRequest(
        service=args.service, include_revoked=args.include_revoked
    )
    keys = (await client.call(client.services.ListServiceKeys, request)).keys
    if ctx.json:
        print_json(keys)
        return EXIT_OK
    rows = [
        (
            k.key_id,
            k.prefix + "…",
            when(k.created_at),
            f"revoked {when(k.revoked_at)}" if k.HasField("revoked_at") else "",
            k.description,
        )
        for k in keys
    ]
    print(table(["KEY", "PREFIX", "CREATED", "REVOKED", "DESCRIPTION"], rows))
    return EXIT_OK


async def revoke_key(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.RevokeServiceKeyRequest(service=args.service, key_id=args.key_id)
    key = (await client.call(client.services.RevokeServiceKey, request)).key
    if ctx.json:
        print_json(key)
    else:
        print(f"caller key {key.key_id} revoked at {when(key.revoked_at)}")
    return EXIT_OK
