"""`smartedu tenant add | list | show | set`: onboard a school (tenant) and configure it.

Each value is checked when the command line is read, the way the server uses it (exit status 2 and
argparse's usage line, naming the option): an origin is stored as browsers send it, since the server
compares them exactly. What the database holds or lacks (a tenant that exists already, or not at all) is
one line on stderr and exit status 1. Results go to stdout: lines, or one JSON document with --json.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

from storage.errors import NotFoundError
from storage.tenants import Holdings, Tenant, TenantStore

from . import lifecycle_cli
from .lti_cli import tenant_id
from .origins import canonical_origin, is_plain_origin
from .settings import Settings

T = TypeVar("T")

MAX_NAME_CHARS = 200
MAX_BUDGET = 2**63 - 1  # tenants' budget columns are bigint
MAX_RETENTION_DAYS = 2**31 - 1  # retention_days is integer
NONE = "none"

_EXAMPLES = """examples:
  smartedu tenant add school-a --name "School A"
  smartedu tenant set school-a --add-origin https://moodle.school-a.example --retention-days 365
  smartedu tenant set school-a --system-prompt-file school-a-prompt.txt --user-daily-token-budget 50000
  smartedu tenant show school-a
  smartedu tenant list --json"""

# The settings `set` changes, in the order they are reported, with their labels.
_LABELS = {
    "name": "name",
    "system_prompt": "system prompt",
    "daily_token_budget": "daily token budget",
    "user_daily_token_budget": "user daily token budget",
    "retention_days": "retention days",
}


# -- what each value may be ------------------------------------------------------------------------


def name(text: str) -> str:
    """An argparse type: the school's display name."""
    if len(text) > MAX_NAME_CHARS:
        raise argparse.ArgumentTypeError(f"the name is longer than {MAX_NAME_CHARS} characters")
    if text != text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise argparse.ArgumentTypeError(f"the name {text!r} has spaces around it or a control character")
    return text


def _number_or_none(text: str, what: str, smallest: int, largest: int) -> int | None:
    if text.lower() == NONE:
        return None
    if not text.isascii() or not text.isdigit() or not smallest <= int(text) <= largest:
        raise argparse.ArgumentTypeError(f"the {what} must be a whole number from {smallest} to {largest}, or none")
    return int(text)


def budget(text: str) -> int | None:
    """An argparse type: a daily token budget, 0 for unlimited, or `none` for the server's default."""
    return _number_or_none(text, "budget", 0, MAX_BUDGET)


def retention(text: str) -> int | None:
    """An argparse type: a retention in days (at least 1), or `none` for the purge's --older-than."""
    return _number_or_none(text, "retention", 1, MAX_RETENTION_DAYS)


def origin(text: str) -> str:
    """An argparse type: an origin allowed to embed the tutor, as browsers send it."""
    try:
        return canonical_origin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"the origin {text!r} {exc}") from None


def prompt(text: str) -> str:
    """An argparse type: the school's instructions for the tutor (a blank one would be ignored)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the system prompt is blank: --no-system-prompt removes it")
    if "\x00" in text:
        raise argparse.ArgumentTypeError("the system prompt holds a NUL character")
    return text


def prompt_file(text: str) -> str:
    """An argparse type: a UTF-8 file holding the system prompt."""
    try:
        return prompt(Path(text).read_text(encoding="utf-8-sig"))  # a byte order mark is not text
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8 text") from None


# -- the commands ----------------------------------------------------------------------------------


class _Unset:
    """The default of an option that takes `none` (None): the option was not given."""


UNSET = _Unset()


class _ActionParser(argparse.ArgumentParser):
    """A `tenant` action's parser: `set` also checks what one option cannot alone (a usage error, status 2)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if hasattr(parsed, "remove_origin"):  # `set`
            if not _settings(parsed) and not parsed.add_origin and not parsed.remove_origin:
                self.error("nothing to change: give at least one option (see --help)")
            if "" in parsed.remove_origin:
                self.error("argument --remove-origin: the origin must not be empty")
            both = set(parsed.add_origin) & {_comparable(text) for text in parsed.remove_origin}
            if both:
                self.error(f"argument --remove-origin: {min(both)} is given to --add-origin too")
        return parsed, extras


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tenant` (add, list, show, set) to the `smartedu` command."""
    raw = argparse.RawDescriptionHelpFormatter
    tenant = subparsers.add_parser(
        "tenant",
        help="onboard a school (tenant) and configure it",
        formatter_class=raw,
        description="Create the tenants (schools) and set what each may do: its name, the instructions the\n"
        "tutor follows, its token budgets, how long its conversations are kept and the origins that may\n"
        "embed the tutor. A tenant is deleted with its data by no command: see docs/operations.md.\n"
        "Uses DATABASE_URL (or the embedded server), and no Redis.",
        epilog=_EXAMPLES,
    )
    actions = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION", parser_class=_ActionParser)

    add = _action(
        actions,
        "add",
        help="create a tenant",
        description="Create a tenant with the server's defaults (no instructions, the environment's budgets,\n"
        "the purge's retention, no origins of its own): `smartedu tenant set` changes them. The id is\n"
        "the `tid` its users' tokens carry. An id that exists already is refused.",
        examples=['smartedu tenant add school-a --name "School A"'],
        json_help="print the tenant as JSON",
    )
    add.add_argument("--name", type=name, default="", help="the school's name, for people")
    _action(
        actions,
        "list",
        help="list the tenants",
        description="List every tenant with its name, budgets, retention and number of origins.",
        examples=["smartedu tenant list", "smartedu tenant list --json"],
        json_help="print a JSON array of tenants",
        one_tenant=False,
    )
    _action(
        actions,
        "show",
        help="show a tenant's settings and what it holds",
        description="Show every setting of a tenant, and how many users, courses and conversations it has.",
        examples=["smartedu tenant show school-a", "smartedu tenant show school-a --json"],
        json_help="print the tenant as JSON",
    )
    change = _action(
        actions,
        "set",
        help="change a tenant's settings",
        description="Change the settings given, and print what changed. `none` returns a budget or the\n"
        "retention to the server's default. Origins are stored as browsers send them (scheme://host[:port],\n"
        "lowercase, no default port, no path). How soon the servers apply a change: docs/operations.md.",
        examples=[
            "smartedu tenant set school-a --add-origin https://moodle.school-a.example",
            "smartedu tenant set school-a --remove-origin https://old-lms.school-a.example",
            'smartedu tenant set school-a --system-prompt "Answer in French; the students are 12 to 14."',
            "smartedu tenant set school-a --daily-token-budget 2000000 --user-daily-token-budget none",
            "smartedu tenant set school-a --retention-days 365",
        ],
        json_help="print the tenant after the change as JSON",
    )
    change.add_argument("--name", type=name, help="the school's name, for people")
    instructions = change.add_mutually_exclusive_group()
    instructions.add_argument(
        "--system-prompt", type=prompt, metavar="TEXT", help="instructions the tutor follows in every answer"
    )
    instructions.add_argument(
        "--system-prompt-file", type=prompt_file, metavar="F", help="the instructions, read from a UTF-8 file"
    )
    instructions.add_argument("--no-system-prompt", action="store_true", help="remove the instructions")
    change.add_argument(
        "--daily-token-budget",
        default=UNSET,
        type=budget,
        metavar="N|none",
        help="tokens the whole school may use a day; 0 unlimited, none the server's SMARTEDU_TENANT_DAILY_TOKENS",
    )
    change.add_argument(
        "--user-daily-token-budget",
        default=UNSET,
        type=budget,
        metavar="N|none",
        help="tokens each user may use a day; 0 unlimited, none the server's SMARTEDU_USER_DAILY_TOKENS",
    )
    change.add_argument(
        "--retention-days",
        default=UNSET,
        type=retention,
        metavar="N|none",
        help="days a conversation is kept after its last message (`smartedu purge`); none: the purge's --older-than",
    )
    change.add_argument(
        "--add-origin",
        type=origin,
        action="append",
        default=[],
        metavar="URL",
        help="allow this origin to embed the tutor (repeatable)",
    )
    change.add_argument(
        "--remove-origin",
        action="append",
        default=[],
        metavar="URL",
        help="stop allowing this origin (repeatable)",
    )


def _action(
    actions: argparse._SubParsersAction[_ActionParser],
    action: str,
    *,
    help: str,
    description: str,
    examples: list[str],
    json_help: str,
    one_tenant: bool = True,
) -> argparse.ArgumentParser:
    """A `tenant` action: on one tenant (`ID`) unless not `one_tenant`, with --json."""
    parser = actions.add_parser(
        action,
        help=help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog="examples:\n" + "".join(f"  {example}\n" for example in examples),
    )
    if one_tenant:
        parser.add_argument("tenant", type=tenant_id, metavar="ID", help="the tenant id, as tokens carry it (`tid`)")
    parser.add_argument("--json", action="store_true", help=json_help)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one `smartedu tenant` action against `settings.database_url`; return the exit status."""
    handler = _HANDLERS[args.tenant_command]
    return lifecycle_cli.run_reporting(f"tenant {args.tenant_command}", settings, lambda: handler(args, settings))


def _with_store(settings: Settings, action: Callable[[TenantStore], Awaitable[T]]) -> T:
    return asyncio.run(lifecycle_cli.with_schema(settings, lambda pool: action(TenantStore(pool))))


def _add(args: argparse.Namespace, settings: Settings) -> int:
    tenant = _with_store(settings, lambda store: store.add_tenant(args.tenant, args.name))
    if args.json:
        lifecycle_cli.print_json(_document(tenant))
        return 0
    print(f"created tenant {tenant.id!r}" + (f" ({tenant.name})" if tenant.name else ""))
    print(f"next: `smartedu tenant set {tenant.id} --help` configures it, `smartedu lti add --help` registers its LMS")
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    tenants = _with_store(settings, lambda store: store.list_tenants())
    if args.json:
        lifecycle_cli.print_json([_document(tenant) for tenant in tenants])
        return 0
    if not tenants:
        print("there are no tenants: `smartedu tenant add --help` creates one")
        return 0
    header = ("ID", "NAME", "DAILY BUDGET", "USER BUDGET", "RETENTION", "ORIGINS", "CREATED")
    rows = [header]
    for t in tenants:
        rows.append(
            (
                t.id,
                t.name,
                _short_budget(t.daily_token_budget),
                _short_budget(t.user_daily_token_budget),
                "default" if t.retention_days is None else f"{t.retention_days} d",
                str(len(t.allowed_origins)),
                f"{t.created_at.astimezone(UTC):%Y-%m-%d}",
            )
        )
    lifecycle_cli.print_table(rows)
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    async def read(store: TenantStore) -> tuple[Tenant, Holdings]:
        tenant = await store.get_tenant(args.tenant)
        if tenant is None:
            raise _no_tenant(args.tenant)
        return tenant, await store.count_holdings(args.tenant)

    tenant, holdings = _with_store(settings, read)
    if args.json:
        lifecycle_cli.print_json(
            {
                **_document(tenant),
                "users": holdings.users,
                "courses": holdings.courses,
                "conversations": holdings.conversations,
            }
        )
        return 0
    print(f"tenant {tenant.id!r}")
    print(f"  {'name:':<25}{tenant.name}")
    print(f"  {'created:':<25}{tenant.created_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC")
    for setting in ("daily_token_budget", "user_daily_token_budget", "retention_days"):
        print(f"  {_LABELS[setting] + ':':<25}{_value(setting, getattr(tenant, setting))}")
    origins = [_origin_entry(o) for o in tenant.allowed_origins]
    print(f"  {'allowed origins:':<25}" + (f"\n  {'':<25}".join(origins) if origins else "none"))
    users, courses = _plural(holdings.users, "user"), _plural(holdings.courses, "course")
    print(f"  {'holds:':<25}{users}, {courses}, {_plural(holdings.conversations, 'conversation')}")
    if tenant.system_prompt is None:
        print(f"  {'system prompt:':<25}none")
    else:
        print(f"  {'system prompt:':<25}{_plural(len(tenant.system_prompt), 'character')}")
        for line in tenant.system_prompt.splitlines():
            print(f"    {line}".rstrip())
    return 0


def _set(args: argparse.Namespace, settings: Settings) -> int:
    missing: list[str] = []

    def edit(origins: tuple[str, ...]) -> tuple[str, ...]:
        kept = list(origins)
        for text in args.remove_origin:
            matching = [o for o in kept if o == text or _comparable(o) == _comparable(text)]
            if not matching:
                missing.append(text)
            kept = [o for o in kept if o not in matching]
        if missing:
            raise NotFoundError(
                f"tenant {args.tenant!r} does not allow the origin {missing[0]!r}: nothing was changed "
                f"(it allows: {', '.join(origins) or 'no origins'})"
            )
        return tuple(kept + [o for o in args.add_origin if o not in kept])

    update = _with_store(settings, lambda store: store.update_tenant(args.tenant, _settings(args), edit))
    before, after = update.before, update.after
    if args.json:
        lifecycle_cli.print_json(_document(after))
        return 0
    changes = [
        f"{label}: {_change(setting, getattr(before, setting), getattr(after, setting))}"
        for setting, label in _LABELS.items()
        if getattr(before, setting) != getattr(after, setting)
    ]
    changes += [f"allowed origin added: {o}" for o in after.allowed_origins if o not in before.allowed_origins]
    changes += [f"allowed origin removed: {o}" for o in before.allowed_origins if o not in after.allowed_origins]
    if not changes:
        print(f"tenant {args.tenant!r} has these settings already: nothing changed")
        return 0
    print(f"updated tenant {args.tenant!r}:")
    for line in changes:
        print(f"  {line}")
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "add": _add,
    "list": _list,
    "show": _show,
    "set": _set,
}


def _settings(args: argparse.Namespace) -> dict[str, object]:
    """The columns `set` was asked to change, with their new values (None clears one)."""
    changed: dict[str, object] = {}
    if args.name is not None:
        changed["name"] = args.name
    if args.no_system_prompt:
        changed["system_prompt"] = None
    elif (text := args.system_prompt or args.system_prompt_file) is not None:
        changed["system_prompt"] = text
    for setting in ("daily_token_budget", "user_daily_token_budget", "retention_days"):
        if getattr(args, setting) is not UNSET:
            changed[setting] = getattr(args, setting)
    return changed


# -- output ----------------------------------------------------------------------------------------


def _comparable(text: str) -> str:
    """An origin as `canonical_origin` makes it, or the text itself if it is none (an entry written by SQL)."""
    try:
        return canonical_origin(text)
    except ValueError:
        return text


def _origin_entry(entry: str) -> str:
    """An allowed origin as `show` prints it, with what is wrong with one written by SQL."""
    if not is_plain_origin(entry.rstrip("/")):
        return f"{entry!r} (ignored: not an origin; --remove-origin removes it)"
    if (canonical := _comparable(entry)) != entry:
        return f"{entry} (browsers send {canonical}: matched by the embed page only; --add-origin that)"
    return entry


def _no_tenant(tenant: str) -> NotFoundError:
    return NotFoundError(f"there is no tenant {tenant!r}: see `smartedu tenant list`")


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def _short_budget(value: int | None) -> str:
    return "default" if value is None else "unlimited" if value == 0 else f"{value:,}"


def _value(setting: str, value: object) -> str:
    if setting == "retention_days":
        return "none (the purge's --older-than)" if value is None else _plural(int(str(value)), "day")
    if setting in ("daily_token_budget", "user_daily_token_budget"):
        env = "SMARTEDU_TENANT_DAILY_TOKENS" if setting == "daily_token_budget" else "SMARTEDU_USER_DAILY_TOKENS"
        if value is None:
            return f"none (the server's {env})"
        return "0 (unlimited)" if value == 0 else f"{_plural(int(str(value)), 'token')} a day"
    if setting == "system_prompt":
        return "none" if value is None else _plural(len(str(value)), "character")
    return repr(value)


def _change(setting: str, before: object, after: object) -> str:
    return f"{_value(setting, before)} -> {_value(setting, after)}"


def _document(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "system_prompt": tenant.system_prompt,
        "daily_token_budget": tenant.daily_token_budget,
        "user_daily_token_budget": tenant.user_daily_token_budget,
        "retention_days": tenant.retention_days,
        "allowed_origins": list(tenant.allowed_origins),
        "created_at": tenant.created_at.astimezone(UTC).isoformat(),
    }
