"""`smartedu lti add | list | show | remove`: the LMS platforms (LTI 1.3 registrations) of each school.

Each field is checked when the command line is read (exit status 2 and argparse's usage line, naming the
option), so that nothing is stored that would make every launch fail. What the database refuses or holds
already (a duplicate issuer and client id, a platform the tenant does not have) is one line on stderr and
exit status 1. Results go to stdout: a table or lines, or one JSON document with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, TypeVar
from urllib.parse import urlsplit

from storage.errors import NotFoundError
from storage.lifecycle import LifecycleError
from storage.lti import Launched, LtiStore, Platform, Registered, Registration

from . import lifecycle_cli
from .lti import JwksFetchError, fetch_jwks, parse_jwks
from .settings import Settings

T = TypeVar("T")

# What /lti/login accepts (server/lti.py reads iss and client_id up to 500 characters, lti_deployment_id
# too): a longer value could be stored but never logged in with. A tenant id, as tokens' `tid` allows.
MAX_ID_CHARS = 500
MAX_TENANT_CHARS = 100
MAX_URL_CHARS = 2048
_TENANT_HELP = "the tenant (school) id"

_EXAMPLES = """examples:
  smartedu lti add --tenant school-a --issuer https://moodle.school-a.example --client-id AbC123xYz \\
      --deployment-id 1 --auth-login-url https://moodle.school-a.example/mod/lti/auth.php \\
      --jwks-url https://moodle.school-a.example/mod/lti/certs.php
  smartedu lti list --tenant school-a
  smartedu lti show --tenant school-a 3
  smartedu lti remove --tenant school-a 3"""


# -- what each field may be ------------------------------------------------------------------------


def _plain(text: str, what: str, max_chars: int) -> str:
    """`text` unless it is empty, too long, padded with spaces or holds control characters (a value pasted
    with a newline or a tab would never match what the LMS sends)."""
    if not text:
        raise argparse.ArgumentTypeError(f"the {what} must not be empty")
    if len(text) > max_chars:
        raise argparse.ArgumentTypeError(f"the {what} is longer than {max_chars} characters")
    if text != text.strip():
        raise argparse.ArgumentTypeError(f"the {what} {text!r} has spaces around it")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise argparse.ArgumentTypeError(f"the {what} {text!r} holds a control character")
    return text


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(text: str, what: str, max_chars: int = MAX_URL_CHARS) -> str:
    """An absolute https URL; http only to a loopback host (a platform on this machine, for testing)."""
    text = _plain(text, what, max_chars)
    try:
        parts = urlsplit(text)
        host = parts.hostname if parts.port != 0 else None  # .port raises for a port that is not 1-65535
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number
        host = None
    if not host or " " in text:
        raise argparse.ArgumentTypeError(f"the {what} {text!r} is not a URL like https://lms.example.edu/path")
    # Literally lowercase: lti_platforms checks the column against '^https?://'.
    if not (text.startswith("https://") or (text.startswith("http://") and _loopback(host))):
        raise argparse.ArgumentTypeError(
            f"the {what} {text!r} must start with https:// (http:// only for a loopback host such as 127.0.0.1)"
        )
    if parts.username is not None or parts.password is not None:
        raise argparse.ArgumentTypeError(f"the {what} {text!r} must not hold a user name or password")
    if parts.fragment or text.endswith("#"):
        raise argparse.ArgumentTypeError(f"the {what} {text!r} must not have a #fragment")
    return text


def tenant_id(text: str) -> str:
    """An argparse type: a tenant id as tokens carry it."""
    return _plain(text, "tenant id", MAX_TENANT_CHARS)


def client_id(text: str) -> str:
    """An argparse type: the client id the LMS gave the tool."""
    return _plain(text, "client id", MAX_ID_CHARS)


def deployment_id(text: str) -> str:
    """An argparse type: a deployment id of the tool in the LMS."""
    return _plain(text, "deployment id", MAX_ID_CHARS)


def issuer(text: str) -> str:
    """An argparse type: the platform's issuer, compared exactly with the id_token's `iss`."""
    text = _url(text, "issuer", MAX_ID_CHARS)
    if urlsplit(text).query or text.endswith("?"):  # LTI 1.3 (OIDC): an issuer has no query
        raise argparse.ArgumentTypeError(f"the issuer {text!r} must not have a ?query")
    return text


def auth_login_url(text: str) -> str:
    """An argparse type: the platform's OIDC authorization endpoint."""
    return _url(text, "auth login URL")


def jwks_url(text: str) -> str:
    """An argparse type: where the platform publishes its signing keys."""
    return _url(text, "JWKS URL")


# -- the commands ----------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `lti` (add, list, show, remove) to the `smartedu` command."""
    raw = argparse.RawDescriptionHelpFormatter
    lti = subparsers.add_parser(
        "lti",
        help="register and manage the LMS platforms (LTI 1.3) of each school",
        formatter_class=raw,
        description="Register the LMS platforms that open the tutor with LTI 1.3 launches (docs/lti.md).\n"
        "Each registration belongs to one tenant (school); launches from it create that tenant's\n"
        "courses and users. Uses DATABASE_URL (or the embedded server), and no Redis.",
        epilog=_EXAMPLES,
    )
    actions = lti.add_subparsers(dest="lti_command", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="register a platform for a tenant",
        formatter_class=raw,
        description="Register an LMS for a tenant, with the values the LMS shows once the tutor is added to\n"
        "it as an LTI 1.3 tool. The tenant is created if it does not exist. An issuer and client id\n"
        "registered already are refused, unless --update (the same tenant's registration: its\n"
        "deployment id and URLs are replaced). URLs must be https:// (http:// only for a loopback host).",
        epilog="examples:\n"
        "  # Moodle: Site administration > Plugins > External tool > Manage tools > the tool's details\n"
        "  smartedu lti add --tenant school-a --issuer https://moodle.school-a.example --client-id AbC123xYz \\\n"
        "      --deployment-id 1 --auth-login-url https://moodle.school-a.example/mod/lti/auth.php \\\n"
        "      --jwks-url https://moodle.school-a.example/mod/lti/certs.php\n"
        "  # Canvas: Admin > Developer Keys (the key's ID is the client id); every deployment of the key\n"
        "  smartedu lti add --tenant school-b --issuer https://canvas.instructure.com \\\n"
        "      --client-id 10000000000042 --any-deployment \\\n"
        "      --auth-login-url https://sso.canvaslms.com/api/lti/authorize_redirect \\\n"
        "      --jwks-url https://sso.canvaslms.com/api/lti/security/jwks",
    )
    add.add_argument("--tenant", required=True, type=tenant_id, metavar="T", help=_TENANT_HELP)
    add.add_argument(
        "--issuer", required=True, type=issuer, metavar="URL", help="the platform's issuer (platform ID), exactly"
    )
    add.add_argument("--client-id", required=True, type=client_id, metavar="ID", help="the tool's client id in the LMS")
    deployment = add.add_mutually_exclusive_group(required=True)
    deployment.add_argument(
        "--deployment-id", type=deployment_id, metavar="ID", help="accept launches of this deployment only"
    )
    deployment.add_argument(
        "--any-deployment", action="store_true", help="accept launches of every deployment of this client id"
    )
    add.add_argument(
        "--auth-login-url",
        required=True,
        type=auth_login_url,
        metavar="URL",
        help="the platform's authorization endpoint (OIDC auth / authentication request URL)",
    )
    add.add_argument(
        "--jwks-url",
        required=True,
        type=jwks_url,
        metavar="URL",
        help="the platform's public keyset URL (JWKS); redirects are not followed, give the final URL",
    )
    add.add_argument(
        "--check",
        action="store_true",
        help="fetch the key set from --jwks-url first, as a launch would, and register nothing unless it serves"
        " at least one RS256 signing key (catches a mistyped URL now, not at the first launch)",
    )
    add.add_argument(
        "--update",
        action="store_true",
        help="if the issuer and client id are registered for this tenant, replace the deployment id and URLs",
    )
    add.add_argument("--json", action="store_true", help="print the registration as JSON")

    listing = actions.add_parser(
        "list",
        help="list registered platforms",
        formatter_class=raw,
        description="List the registered platforms: one tenant's, or every tenant's without --tenant.",
        epilog="examples:\n  smartedu lti list --tenant school-a\n  smartedu lti list --json",
    )
    listing.add_argument("--tenant", type=tenant_id, metavar="T", help="only this tenant's (default: all tenants)")
    listing.add_argument("--json", action="store_true", help="print a JSON array of registrations")

    show = _platform_action(
        actions,
        "show",
        help="show one platform and what launches from it created",
        description="Show a tenant's platform (its id is in `smartedu lti list`) with every field, and the\n"
        "courses and users that launches from it created.",
        epilog="examples:\n  smartedu lti show --tenant school-a 3\n  smartedu lti show --tenant school-a 3 --json",
    )
    show.add_argument("--json", action="store_true", help="print the registration as JSON")

    remove = _platform_action(
        actions,
        "remove",
        help="remove a platform: its launches are refused from then on",
        description="Remove a tenant's platform. Launches from it are refused from then on, logins in flight\n"
        "included. The courses and users its launches created stay, with their conversations (a\n"
        "registration made again gets a new id, so new launches make new ones). Asks for\n"
        "confirmation unless --yes.",
        epilog="example:\n  smartedu lti remove --tenant school-a 3",
    )
    remove.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _platform_action(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    """An action on one platform of a tenant: `--tenant T ID`."""
    action = actions.add_parser(
        name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter, description=description, epilog=epilog
    )
    action.add_argument("--tenant", required=True, type=tenant_id, metavar="T", help=_TENANT_HELP)
    action.add_argument("platform", type=lifecycle_cli.positive_int, metavar="ID", help="the platform's id")
    return action


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one `smartedu lti` action against `settings.database_url`; return the exit status."""
    handler = _HANDLERS[args.lti_command]
    return lifecycle_cli.run_reporting(f"lti {args.lti_command}", settings, lambda: handler(args, settings))


def _with_store(settings: Settings, action: Callable[[LtiStore], Awaitable[T]]) -> T:
    return asyncio.run(lifecycle_cli.with_schema(settings, lambda pool: action(LtiStore(pool))))


async def _signing_keys(url: str) -> list[str]:
    """The kids of the RS256 signing keys at `url`, fetched as a launch fetches them."""
    try:
        keys = parse_jwks(await fetch_jwks(url))
    except JwksFetchError as exc:
        raise LifecycleError(f"the key set at {url} could not be read: {exc}; nothing was registered") from None
    if not keys:
        raise LifecycleError(f"the key set at {url} has no RS256 signing key; nothing was registered")
    return sorted(keys)


def _add(args: argparse.Namespace, settings: Settings) -> int:
    kids = asyncio.run(_signing_keys(args.jwks_url)) if args.check else None
    registered: Registered = _with_store(
        settings,
        lambda store: store.register_platform(
            args.tenant,
            args.issuer,
            args.client_id,
            args.deployment_id,
            args.auth_login_url,
            args.jwks_url,
            update=args.update,
        ),
    )
    platform, previous = registered.registration.platform, registered.previous
    changes = _changes(previous, platform) if previous is not None else []
    status = "added" if previous is None else "updated" if changes else "unchanged"
    if args.json:
        checked = {} if kids is None else {"signing_keys": kids}
        lifecycle_cli.print_json(
            {**_document(registered.registration), "status": status, "tenant_created": registered.tenant_created}
            | checked
        )
        return 0
    if kids is not None:
        print(f"key set: {len(kids)} RS256 signing key{'s' if len(kids) != 1 else ''} ({', '.join(kids)})")
    if registered.tenant_created:
        print(f"created tenant {platform.tenant_id!r}")
    if previous is None:
        print(f"registered platform {platform.id} for tenant {platform.tenant_id!r}")
        _print_fields(registered.registration)
    elif changes:
        print(f"updated platform {platform.id} of tenant {platform.tenant_id!r}: " + "; ".join(changes))
    else:
        print(f"platform {platform.id} of tenant {platform.tenant_id!r} is registered with these values already")
    if settings.public_url:
        base = settings.public_url.rstrip("/")
        print(f"in the LMS: login URL {base}/lti/login, redirect and target link URI {base}/lti/launch")
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    registrations = _with_store(settings, lambda store: store.list_registrations(args.tenant))
    if args.json:
        lifecycle_cli.print_json([_document(registration) for registration in registrations])
        return 0
    if not registrations:
        whose = f"tenant {args.tenant!r} has" if args.tenant else "there are"
        print(f"{whose} no LTI platforms: `smartedu lti add --help` registers one")
        return 0
    header = ("ID", "TENANT", "ISSUER", "CLIENT ID", "DEPLOYMENT", "REGISTERED")
    rows = [header]
    for registration in registrations:
        p, registered = registration.platform, registration.created_at.astimezone(UTC)
        rows.append((str(p.id), p.tenant_id, p.issuer, p.client_id, _deployment(p), f"{registered:%Y-%m-%d}"))
    lifecycle_cli.print_table(rows)
    return 0


def _read(args: argparse.Namespace, settings: Settings) -> tuple[Registration, Launched]:
    """The tenant's platform named on the command line and what its launches made, or `NotFoundError`."""

    async def read(store: LtiStore) -> tuple[Registration, Launched]:
        registration = await store.get_registration(args.tenant, args.platform)
        if registration is None:
            raise _no_platform(args)
        return registration, await store.count_launched(args.tenant, args.platform)

    return _with_store(settings, read)


def _show(args: argparse.Namespace, settings: Settings) -> int:
    registration, launched = _read(args, settings)
    if args.json:
        lifecycle_cli.print_json({**_document(registration), "courses": launched.courses, "users": launched.users})
        return 0
    print(f"platform {registration.platform.id} of tenant {registration.platform.tenant_id!r}")
    _print_fields(registration)
    print(f"  launches made:   {_launched(launched)}")
    return 0


def _remove(args: argparse.Namespace, settings: Settings) -> int:
    registration, launched = _read(args, settings)
    print(f"platform {args.platform} of tenant {args.tenant!r}")
    _print_fields(registration)
    print(f"  launches made:   {_launched(launched)} (they stay)")
    prompt = "Remove this platform? Launches from it are refused from then on. [y/N] "
    if not args.yes and not lifecycle_cli.confirm(prompt):
        print("nothing removed", file=sys.stderr)
        return 1

    async def remove(store: LtiStore) -> None:
        if not await store.remove_platform(args.tenant, args.platform):
            raise _no_platform(args)

    _with_store(settings, remove)
    print(f"removed platform {args.platform} of tenant {args.tenant!r}")
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "add": _add,
    "list": _list,
    "show": _show,
    "remove": _remove,
}


# -- output ----------------------------------------------------------------------------------------


def _no_platform(args: argparse.Namespace) -> NotFoundError:
    return NotFoundError(f"tenant {args.tenant!r} has no LTI platform {args.platform}: see `smartedu lti list`")


def _deployment(platform: Platform) -> str:
    return platform.deployment_id if platform.deployment_id is not None else "any"


_FIELDS = (
    ("issuer", "issuer"),
    ("client_id", "client id"),
    ("deployment_id", "deployment id"),
    ("auth_login_url", "auth login URL"),
    ("jwks_url", "JWKS URL"),
)


def _field(platform: Platform, name: str) -> str:
    return _deployment(platform) if name == "deployment_id" else str(getattr(platform, name))


def _print_fields(registration: Registration) -> None:
    for name, label in _FIELDS:
        print(f"  {label + ':':<16} {_field(registration.platform, name)}")
    print(f"  {'registered:':<16} {registration.created_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC")


def _changes(previous: Platform, current: Platform) -> list[str]:
    return [
        f"{label} {_field(previous, name)} -> {_field(current, name)}"
        for name, label in _FIELDS
        if getattr(previous, name) != getattr(current, name)
    ]


def _launched(launched: Launched) -> str:
    courses = "course" if launched.courses == 1 else "courses"
    users = "user" if launched.users == 1 else "users"
    return f"{launched.courses} {courses}, {launched.users} {users}"


def _document(registration: Registration) -> dict[str, Any]:
    p = registration.platform
    return {
        "id": p.id,
        "tenant": p.tenant_id,
        "issuer": p.issuer,
        "client_id": p.client_id,
        "deployment_id": p.deployment_id,
        "auth_login_url": p.auth_login_url,
        "jwks_url": p.jwks_url,
        "created_at": registration.created_at.astimezone(UTC).isoformat(),
    }
