"""`aria auth ...` (API keys) and `aria audit` (who did what)."""

from __future__ import annotations

import click

from aria_trio.cli import Context, main
from aria_trio.cli.output import call, pages, show, show_list, table, when
from aria_trio.proto.aria.v1 import auth_pb2 as pb
from aria_trio.rpc import Channel

AUTH = "/aria.v1.AuthService/"


@main.group()
def auth() -> None:
    """API keys, for callers that act for a user (a web front end, the notification tap)."""


@auth.command("create-key")
@click.option("--user", default="", help="The user the key acts for (default: you; others: administrators only).")
@click.option("--name", default="", help="What the key is for, to recognise it later.")
@click.pass_obj
def create_key(obj: Context, user: str, name: str) -> None:
    """Make a key and print it once (it is not kept: only its hash is). Send it as the metadata
    `authorization: Bearer <key>`."""
    made = call(obj, AUTH + "CreateApiKey", pb.CreateApiKeyRequest(user_id=user, name=name), pb.CreatedApiKey)
    show(obj, made, f"{made.secret}\n(key {made.key.id} for {made.key.user_id}; it is shown only this once)")


def _key_rows(keys: list[pb.ApiKey]) -> list[tuple[str, str, str, str, str]]:
    def state(k: pb.ApiKey) -> str:
        return "revoked " + when(k.revoked_at) if k.HasField("revoked_at") else "active"

    return [(k.id, k.user_id, k.name or "-", when(k.last_used_at), state(k)) for k in keys]


@auth.command("list-keys")
@click.option("--user", default="", help="Another user's keys (administrators; '*' for everyone's).")
@click.pass_obj
def list_keys(obj: Context, user: str) -> None:
    """List API keys (never their secrets)."""
    keys = list(call(obj, AUTH + "ListApiKeys", pb.ListApiKeysRequest(user_id=user), pb.ListApiKeysResponse).keys)
    show_list(obj, keys, table(("ID", "USER", "NAME", "LAST USED", "STATE"), _key_rows(keys), "(no keys)"))


@auth.command("revoke-key")
@click.argument("key_id")
@click.pass_obj
def revoke_key(obj: Context, key_id: str) -> None:
    """Revoke a key: calls with it are refused from now on."""
    key = call(obj, AUTH + "RevokeApiKey", pb.RevokeApiKeyRequest(key_id=key_id), pb.ApiKey)
    show(obj, key, f"revoked {key.id} (of {key.user_id})")


@main.command()
@click.option("--actor", default="", help="Only this user's actions (administrators; others see their own).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Entries per page.")
@click.option("--all", "every", is_flag=True, help="Every page, not just the newest.")
@click.pass_obj
def audit(obj: Context, actor: str, limit: int, every: bool) -> None:
    """Who created, cancelled, removed, uploaded, or changed preferences or keys, newest first."""

    async def listing(channel: Channel) -> list[pb.AuditEvent]:
        request = pb.ListAuditEventsRequest(page_size=limit, actor=actor)
        path, reply = AUTH + "ListAuditEvents", pb.ListAuditEventsResponse
        events, _ = await pages(obj, channel, path, request, reply, lambda page: page.events, every)
        return events

    events = obj.run(listing)
    rows = [(when(e.at), e.actor, e.action, f"{e.resource_type} {e.resource_id}", e.request_id) for e in events]
    show_list(obj, events, table(("WHEN", "ACTOR", "ACTION", "RESOURCE", "REQUEST ID"), rows, "(nothing yet)"))
