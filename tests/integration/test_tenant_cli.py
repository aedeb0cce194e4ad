"""`smartedu tenant add | list | show | set` against the real PostgreSQL of the test run: what each action
writes and prints, every refusal (exit 2 naming the option for a bad value, exit 1 for what the database
holds or lacks), and an origin allowed with the command that then frames /embed and opens a socket on a
running app, until it is removed again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server import tenant_cli
from server.errors import CloseCode
from server.settings import Settings
from tests.conftest import Serve, Services, token
from tests.integration.test_lti_cli import Result, run_command

pytestmark = pytest.mark.integration

TENANT = "school-a"
LMS = "https://moodle.school-a.example"


async def smartedu(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """`smartedu tenant ...`."""
    return await run_command(tenant_cli.run, settings, capsys, "tenant", *argv)


async def row(db: asyncpg.Connection, tenant: str = TENANT) -> dict[str, Any] | None:
    found = await db.fetchrow(
        "SELECT name, system_prompt, daily_token_budget, user_daily_token_budget, retention_days, allowed_origins"
        " FROM tenants WHERE id = $1",
        tenant,
    )
    return dict(found) if found else None


DEFAULTS = {
    "name": "",
    "system_prompt": None,
    "daily_token_budget": None,
    "user_daily_token_budget": None,
    "retention_days": None,
    "allowed_origins": [],
}


@pytest.mark.parametrize("action", [[], ["add"], ["list"], ["show"], ["set"]])
async def test_every_tenant_action_has_help_with_examples(
    settings: Settings, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    result = await smartedu(settings, capsys, *action, "--help")
    assert result.code == 0 and f"usage: smartedu tenant {' '.join(action)}".strip() in result.out
    assert "example" in result.out


async def test_add_creates_the_tenant_once_and_list_shows_it(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = await smartedu(settings, capsys, "list")
    assert empty == Result(0, "there are no tenants: `smartedu tenant add --help` creates one\n", "")

    added = await smartedu(settings, capsys, "add", TENANT, "--name", "School A")
    assert added.code == 0, added.err
    assert added.out.startswith(f"created tenant {TENANT!r} (School A)\n")
    assert await row(db) == {**DEFAULTS, "name": "School A"}
    again = await smartedu(settings, capsys, "add", TENANT, "--name", "Other")
    assert again == Result(
        1, "", f"smartedu tenant add: tenant {TENANT!r} exists already: `smartedu tenant set` changes it\n"
    )
    assert await row(db) == {**DEFAULTS, "name": "School A"}

    assert (await smartedu(settings, capsys, "add", "school-b", "--json")).json()["name"] == ""
    await smartedu(settings, capsys, "set", "school-b", "--retention-days", "90", "--daily-token-budget", "0")
    lines = (await smartedu(settings, capsys, "list")).out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "DAILY", "BUDGET", "USER", "BUDGET", "RETENTION", "ORIGINS", "CREATED"]
    assert lines[1].split()[:8] == [
        "school-a",
        "School",
        "A",
        "default",
        "default",
        "default",
        "0",
        lines[1].split()[7],
    ]
    assert lines[2].split()[:5] == ["school-b", "unlimited", "default", "90", "d"]
    listed = (await smartedu(settings, capsys, "list", "--json")).json()
    assert [(t["id"], t["retention_days"], t["daily_token_budget"]) for t in listed] == [
        (TENANT, None, None),
        ("school-b", 90, 0),
    ]


async def test_set_changes_each_setting_and_prints_what_changed(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await smartedu(settings, capsys, "add", TENANT)
    changed = await smartedu(
        settings,
        capsys,
        "set",
        TENANT,
        "--name",
        "School A",
        "--system-prompt",
        "Answer in French.",
        "--daily-token-budget",
        "2000000",
        "--user-daily-token-budget",
        "0",
        "--retention-days",
        "365",
        "--add-origin",
        "HTTPS://Moodle.School-A.example:443/",
        "--add-origin",
        "http://localhost:8080",
    )
    assert changed == Result(
        0,
        f"updated tenant {TENANT!r}:\n"
        "  name: '' -> 'School A'\n"
        "  system prompt: none -> 17 characters\n"
        "  daily token budget: none (the server's SMARTEDU_TENANT_DAILY_TOKENS) -> 2,000,000 tokens a day\n"
        "  user daily token budget: none (the server's SMARTEDU_USER_DAILY_TOKENS) -> 0 (unlimited)\n"
        "  retention days: none (the purge's --older-than) -> 365 days\n"
        f"  allowed origin added: {LMS}\n"
        "  allowed origin added: http://localhost:8080\n",
        "",
    )
    assert await row(db) == {
        "name": "School A",
        "system_prompt": "Answer in French.",
        "daily_token_budget": 2_000_000,
        "user_daily_token_budget": 0,
        "retention_days": 365,
        "allowed_origins": [LMS, "http://localhost:8080"],
    }

    same = await smartedu(settings, capsys, "set", TENANT, "--add-origin", LMS, "--retention-days", "365")
    assert same == Result(0, f"tenant {TENANT!r} has these settings already: nothing changed\n", "")

    prompt = tmp_path / "prompt.txt"
    # Saved by an editor that starts UTF-8 with a byte order mark: the mark is not part of the prompt.
    prompt.write_text("Les élèves ont 12 à 14 ans.\nRéponds en français.\n", encoding="utf-8-sig")
    from_file = await smartedu(settings, capsys, "set", TENANT, "--system-prompt-file", str(prompt))
    assert from_file.out == f"updated tenant {TENANT!r}:\n  system prompt: 17 characters -> 49 characters\n"
    assert (await row(db) or {})["system_prompt"] == "Les élèves ont 12 à 14 ans.\nRéponds en français.\n"

    cleared = await smartedu(
        settings,
        capsys,
        "set",
        TENANT,
        "--no-system-prompt",
        "--daily-token-budget",
        "none",
        "--user-daily-token-budget",
        "NONE",
        "--retention-days",
        "none",
        "--remove-origin",
        "https://MOODLE.school-a.example/",
        "--json",
    )
    assert cleared.json() == {
        "id": TENANT,
        "created_at": cleared.json()["created_at"],
        **DEFAULTS,
        "name": "School A",
        "allowed_origins": ["http://localhost:8080"],
    }
    assert await row(db) == {**DEFAULTS, "name": "School A", "allowed_origins": ["http://localhost:8080"]}


async def test_show_prints_every_setting_and_flags_origins_browsers_never_send(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    await smartedu(settings, capsys, "add", TENANT, "--name", "School A")
    await smartedu(settings, capsys, "set", TENANT, "--system-prompt", "Be brief.\nUse metric units.")
    await smartedu(settings, capsys, "set", TENANT, "--user-daily-token-budget", "50000", "--add-origin", LMS)
    # Entries written with SQL, as the docs used to say: one not an origin, one not as browsers send it.
    await db.execute(
        "UPDATE tenants SET allowed_origins = allowed_origins || ARRAY['*', 'https://Old.example/'] WHERE id = $1",
        TENANT,
    )
    shown = await smartedu(settings, capsys, "show", TENANT)
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert lines[0] == f"tenant {TENANT!r}" and lines[1] == "  name:                    School A"
    assert lines[3:] == [
        "  daily token budget:      none (the server's SMARTEDU_TENANT_DAILY_TOKENS)",
        "  user daily token budget: 50,000 tokens a day",
        "  retention days:          none (the purge's --older-than)",
        f"  allowed origins:         {LMS}",
        "                           '*' (ignored: not an origin; --remove-origin removes it)",
        "                           https://Old.example/ (browsers send https://old.example: matched by the embed "
        "page only; --add-origin that)",
        "  holds:                   0 users, 0 courses, 0 conversations",
        "  system prompt:           27 characters",
        "    Be brief.",
        "    Use metric units.",
    ]
    document = (await smartedu(settings, capsys, "show", TENANT, "--json")).json()
    assert document["allowed_origins"] == [LMS, "*", "https://Old.example/"]
    assert (document["user_daily_token_budget"], document["users"], document["conversations"]) == (50000, 0, 0)

    # What SQL wrote is removed as written, or as browsers would send it.
    removed = await smartedu(
        settings, capsys, "set", TENANT, "--remove-origin", "*", "--remove-origin", "https://old.example"
    )
    assert removed.out.splitlines()[1:] == [
        "  allowed origin removed: *",
        "  allowed origin removed: https://Old.example/",
    ]
    assert (await row(db) or {})["allowed_origins"] == [LMS]


async def test_an_unknown_tenant_is_one_line_and_a_missing_origin_changes_nothing(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    for action in (["show", "school-z"], ["set", "school-z", "--name", "Z"]):
        refused = await smartedu(settings, capsys, *action)
        assert refused.code == 1 and refused.out == "", refused
        assert refused.err.startswith(f"smartedu tenant {action[0]}: there is no tenant 'school-z': ")
        assert len(refused.err.splitlines()) == 1
    assert await db.fetchval("SELECT count(*) FROM tenants") == 0

    await smartedu(settings, capsys, "add", TENANT)
    await smartedu(settings, capsys, "set", TENANT, "--add-origin", LMS)
    missing = await smartedu(
        settings, capsys, "set", TENANT, "--name", "New", "--remove-origin", "https://other.example"
    )
    assert missing == Result(
        1,
        "",
        f"smartedu tenant set: tenant {TENANT!r} does not allow the origin 'https://other.example': nothing was "
        f"changed (it allows: {LMS})\n",
    )
    assert await row(db) == {**DEFAULTS, "allowed_origins": [LMS]}


def _bad(option: str, value: str, refusal: str) -> tuple[list[str], str]:
    return ["set", TENANT, f"--{option}", value], f"argument --{option}: {refusal}"


def _bad_origin(value: str, reason: str) -> tuple[list[str], str]:
    return _bad("add-origin", value, f"the origin {value!r} {reason}")


NOT_AN_ORIGIN = "is not an origin like https://lms.example.edu"
NUMBER = "must be a whole number from"


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (["add", ""], "argument ID: the tenant id must not be empty"),
        (["add", "t" * 101], "argument ID: the tenant id is longer than 100 characters"),
        (["show", " school-a"], "argument ID: the tenant id ' school-a' has spaces around it"),
        (["add", TENANT, "--name", "n" * 201], "argument --name: the name is longer than 200 characters"),
        (["add", TENANT, "--name", "A\tB"], "argument --name: the name 'A\\tB' has spaces around it or a control"),
        (["set", TENANT], "nothing to change: give at least one option"),
        _bad("daily-token-budget", "-1", f"the budget {NUMBER} 0 to 9223372036854775807, or none"),
        _bad("daily-token-budget", "9223372036854775808", f"the budget {NUMBER} 0"),
        _bad("user-daily-token-budget", "1e6", f"the budget {NUMBER} 0"),
        _bad("user-daily-token-budget", "", f"the budget {NUMBER} 0"),
        _bad("retention-days", "0", f"the retention {NUMBER} 1 to 2147483647, or none"),
        _bad("retention-days", "2147483648", f"the retention {NUMBER} 1"),
        _bad("retention-days", "٣", f"the retention {NUMBER} 1"),
        _bad("system-prompt", " \n ", "the system prompt is blank: --no-system-prompt removes it"),
        _bad("system-prompt", "a\x00b", "the system prompt holds a NUL character"),
        _bad("system-prompt-file", "/no/such/prompt.txt", "cannot read '/no/such/prompt.txt': No such file"),
        (
            ["set", TENANT, "--system-prompt", "x", "--no-system-prompt"],
            "argument --no-system-prompt: not allowed with argument --system-prompt",
        ),
        _bad_origin("moodle.school-a.example", NOT_AN_ORIGIN),
        _bad_origin("ftp://lms.example", NOT_AN_ORIGIN),
        _bad_origin(f"{LMS}/course/view.php", "must not have a path, ?query or #fragment"),
        _bad_origin(f"{LMS}?x=1", "must not have a path, ?query or #fragment"),
        _bad_origin("https://admin:pw@lms.example", "must not hold a user name or password"),
        _bad_origin("https://bücher.example", "has a host that is not ASCII: give it as browsers send it"),
        _bad_origin("*", NOT_AN_ORIGIN),
        _bad_origin("https://*.school-a.example", NOT_AN_ORIGIN),
        _bad_origin("https://lms.example:99999", NOT_AN_ORIGIN),
        _bad_origin("https://lms.example;script-src *", NOT_AN_ORIGIN),
        _bad("remove-origin", "", "the origin must not be empty"),
        (
            ["set", TENANT, "--add-origin", LMS, "--remove-origin", f"{LMS}/"],
            f"argument --remove-origin: {LMS} is given to --add-origin too",
        ),
    ],
)
async def test_a_bad_value_is_a_usage_error_naming_the_option_and_writes_nothing(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str], argv: list[str], refusal: str
) -> None:
    await db.execute("INSERT INTO tenants (id) VALUES ($1)", TENANT)
    result = await smartedu(settings, capsys, *argv)
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith(f"usage: smartedu tenant {argv[0]}") and refusal in result.err, result.err
    assert await db.fetch("SELECT id FROM tenants") == [(TENANT,)] and await row(db) == DEFAULTS


async def test_the_command_runs_as_smartedu(
    services: Services, db: asyncpg.Connection, tmp_path: Path, settings: Settings
) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "REDIS_CLUSTER_URLS")}
    env.update(DATABASE_URL=services.database_url, SMARTEDU_DATA_DIR=str(tmp_path / "data"))

    def smartedu_process(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "server", "tenant", *argv]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    added = await asyncio.to_thread(smartedu_process, "add", TENANT)
    assert added.returncode == 0 and added.stdout.startswith(f"created tenant {TENANT!r}\n"), added
    bad = await asyncio.to_thread(smartedu_process, "set", TENANT, "--retention-days", "-5")
    assert bad.returncode == 2 and "argument --retention-days: the retention must be" in bad.stderr, bad
    assert await row(db) == DEFAULTS
    assert not (tmp_path / "data").exists()  # a DATABASE_URL: nothing embedded was started


async def test_an_origin_allowed_with_the_command_frames_the_embed_page_and_opens_sockets(
    serve: Serve, settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve()
    embed = f"/embed?course=alg-1&tenant={TENANT}"

    async def frame_ancestors() -> str:
        return (await server.client.get(embed)).headers["Content-Security-Policy"].rsplit("; ", 1)[-1]

    async def socket_refused() -> bool:
        sock = await server.connect({"token": token(tenant=TENANT)}, headers={"Origin": LMS}, welcome=False)
        frame = await sock.recv()
        if frame["type"] == "welcome":
            await sock.close()
            return False
        assert frame["code"] == "forbidden" and await sock.close_code() == CloseCode.FORBIDDEN
        return True

    await smartedu(settings, capsys, "add", TENANT)
    assert await frame_ancestors() == "frame-ancestors 'none'" and await socket_refused()

    added = await smartedu(settings, capsys, "set", TENANT, "--add-origin", "HTTPS://MOODLE.school-a.example:443")
    assert added.out == f"updated tenant {TENANT!r}:\n  allowed origin added: {LMS}\n", added.err
    assert await frame_ancestors() == f"frame-ancestors {LMS}"
    assert not await socket_refused()
    shown = await smartedu(settings, capsys, "show", TENANT, "--json")
    assert (shown.json()["users"], shown.json()["courses"], shown.json()["conversations"]) == (1, 0, 1)

    removed = await smartedu(settings, capsys, "set", TENANT, "--remove-origin", LMS)
    assert removed.out == f"updated tenant {TENANT!r}:\n  allowed origin removed: {LMS}\n", removed.err
    assert await frame_ancestors() == "frame-ancestors 'none'" and await socket_refused()
