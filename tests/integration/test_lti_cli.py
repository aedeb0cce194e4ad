"""`smartedu lti add | list | show | remove` against the real PostgreSQL of the test run: what each action
writes and prints, every refusal (exit 2 naming the option for a bad field, exit 1 for what the database
holds), and a platform registered with the command that then launches the tutor (the fake platform of
test_lti.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from server import lti_cli
from server.__main__ import _parser
from server.settings import Settings
from tests.conftest import Serve, Services, with_database
from tests.integration.test_lti import CLIENT_ID, DEPLOYMENT, FakePlatform, Lti, fragment

pytestmark = pytest.mark.integration

TENANT = "school-cli"
ISSUER = "https://moodle.school-cli.example"
MOODLE = [
    "--issuer",
    ISSUER,
    "--client-id",
    "AbC123xYz",
    "--deployment-id",
    "1",
    "--auth-login-url",
    f"{ISSUER}/mod/lti/auth.php",
    "--jwks-url",
    f"{ISSUER}/mod/lti/certs.php",
]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return orjson.loads(self.out)


async def run_command(
    run: Callable[[argparse.Namespace, Settings], int],
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
) -> Result:
    """`smartedu ARGV` as the command parses it and `run` runs it, with DATABASE_URL set (the test database)."""
    capsys.readouterr()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exited:  # argparse: --help, or a usage error
        code = exited.code
    else:
        # `run` owns its event loop (asyncio.run), as it does under `smartedu`.
        code = await asyncio.to_thread(run, args, settings)
    captured = capsys.readouterr()
    assert isinstance(code, int)
    return Result(code, captured.out, captured.err)


async def smartedu(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """`smartedu lti ...`."""
    return await run_command(lti_cli.run, settings, capsys, "lti", *argv)


async def platforms(db: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, tenant_id, issuer, client_id, deployment_id, auth_login_url, jwks_url FROM lti_platforms"
        " ORDER BY id"
    )
    return [dict(row) for row in rows]


async def tenants(db: asyncpg.Connection) -> list[str]:
    return [row["id"] for row in await db.fetch("SELECT id FROM tenants ORDER BY id")]


@pytest.mark.parametrize("action", [[], ["add"], ["list"], ["show"], ["remove"]])
async def test_every_lti_action_has_help_with_examples(
    settings: Settings, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    result = await smartedu(settings, capsys, *action, "--help")
    assert result.code == 0 and f"usage: smartedu lti {' '.join(action)}".strip() in result.out
    assert "example" in result.out


async def test_add_registers_the_platform_and_creates_its_tenant(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = await smartedu(settings, capsys, "list")
    assert empty == Result(0, "there are no LTI platforms: `smartedu lti add --help` registers one\n", "")

    added = await smartedu(settings, capsys, "add", "--tenant", TENANT, *MOODLE)
    assert added.code == 0, added.err
    [row] = await platforms(db)
    assert row == {
        "id": row["id"],
        "tenant_id": TENANT,
        "issuer": ISSUER,
        "client_id": "AbC123xYz",
        "deployment_id": "1",
        "auth_login_url": f"{ISSUER}/mod/lti/auth.php",
        "jwks_url": f"{ISSUER}/mod/lti/certs.php",
    }
    assert await tenants(db) == [TENANT]
    lines = added.out.splitlines()
    assert lines[:2] == [f"created tenant {TENANT!r}", f"registered platform {row['id']} for tenant {TENANT!r}"]
    assert f"  JWKS URL:        {ISSUER}/mod/lti/certs.php\n" in added.out

    # Canvas: every deployment of the client id (NULL), in a tenant that exists already.
    await db.execute("INSERT INTO tenants (id) VALUES ('school-b')")
    canvas = await smartedu(
        settings,
        capsys,
        "add",
        "--tenant",
        "school-b",
        "--issuer",
        "https://canvas.instructure.com",
        "--client-id",
        "10000000000042",
        "--any-deployment",
        "--json",
        "--auth-login-url",
        "https://sso.canvaslms.com/api/lti/authorize_redirect",
        "--jwks-url",
        "https://sso.canvaslms.com/api/lti/security/jwks",
    )
    document = canvas.json()
    assert (document["status"], document["tenant_created"], document["deployment_id"]) == ("added", False, None)
    assert (await platforms(db))[1]["deployment_id"] is None

    table = (await smartedu(settings, capsys, "list")).out.splitlines()
    assert table[0].split() == ["ID", "TENANT", "ISSUER", "CLIENT", "ID", "DEPLOYMENT", "REGISTERED"]
    assert table[1].split()[:5] == [
        str(document["id"]),
        "school-b",
        "https://canvas.instructure.com",
        "10000000000042",
        "any",
    ]
    assert table[2].split()[:5] == [str(row["id"]), TENANT, ISSUER, "AbC123xYz", "1"]
    [only] = (await smartedu(settings, capsys, "list", "--tenant", TENANT, "--json")).json()
    assert {k: v for k, v in only.items() if k != "created_at"} == {
        "id": row["id"],
        "tenant": TENANT,
        "issuer": ISSUER,
        "client_id": "AbC123xYz",
        "deployment_id": "1",
        "auth_login_url": f"{ISSUER}/mod/lti/auth.php",
        "jwks_url": f"{ISSUER}/mod/lti/certs.php",
    }
    assert only["created_at"].endswith("+00:00")

    shown = await smartedu(settings, capsys, "show", "--tenant", TENANT, str(row["id"]))
    assert shown.code == 0 and "  deployment id:   1\n" in shown.out
    assert "  launches made:   0 courses, 0 users\n" in shown.out
    assert (await smartedu(settings, capsys, "show", "--tenant", TENANT, str(row["id"]), "--json")).json() == {
        **only,
        "courses": 0,
        "users": 0,
    }


async def test_the_lms_values_are_printed_with_a_public_url(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    public = replace(settings, public_url="https://tutor.example.edu")
    added = await smartedu(public, capsys, "add", "--tenant", TENANT, *MOODLE)
    assert added.out.endswith(
        "in the LMS: login URL https://tutor.example.edu/lti/login, "
        "redirect and target link URI https://tutor.example.edu/lti/launch\n"
    )


def _moodle(**changed: str) -> list[str]:
    """MOODLE with options replaced (`client_id="x"` replaces --client-id)."""
    argv = list(MOODLE)
    for name, value in changed.items():
        argv[argv.index("--" + name.replace("_", "-")) + 1] = value
    return argv


def _bad(option: str, value: str, refusal: str) -> tuple[list[str], str]:
    """A Moodle registration with one bad option, and what argparse says of it."""
    argv = ["--tenant", TENANT, *MOODLE]
    if f"--{option}" in argv:
        argv[argv.index(f"--{option}") + 1] = value
    else:
        argv += [f"--{option}", value]
    return argv, f"argument --{option}: {refusal}"


NOT_LOOPBACK = "must start with https:// (http:// only for a loopback host such as 127.0.0.1)"


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        _bad("tenant", "", "the tenant id must not be empty"),
        _bad("tenant", "t" * 101, "the tenant id is longer than 100 characters"),
        _bad("tenant", "school a\n", "the tenant id 'school a\\n' has spaces around it"),
        _bad(
            "issuer",
            "http://moodle.school-cli.example",
            f"the issuer 'http://moodle.school-cli.example' {NOT_LOOPBACK}",
        ),
        _bad("issuer", f"{ISSUER}/?site=1", f"the issuer '{ISSUER}/?site=1' must not have a ?query"),
        _bad(
            "issuer", "moodle.school-cli.example", "the issuer 'moodle.school-cli.example' is not a URL like https://"
        ),
        _bad("issuer", "https://" + "m" * 493, "the issuer is longer than 500 characters"),
        _bad("client-id", "", "the client id must not be empty"),
        _bad("client-id", " AbC123xYz", "the client id ' AbC123xYz' has spaces around it"),
        _bad("client-id", "AbC\t123", "the client id 'AbC\\t123' holds a control character"),
        _bad("client-id", "c" * 501, "the client id is longer than 500 characters"),
        _bad("deployment-id", "", "the deployment id must not be empty"),
        (
            ["--tenant", TENANT, *MOODLE, "--any-deployment"],
            "--any-deployment: not allowed with argument --deployment-id",
        ),
        (
            ["--tenant", TENANT, *MOODLE[:4], *MOODLE[6:]],
            "one of the arguments --deployment-id --any-deployment is required",
        ),
        _bad("auth-login-url", "ftp://lms.example/auth", f"the auth login URL 'ftp://lms.example/auth' {NOT_LOOPBACK}"),
        _bad(
            "auth-login-url",
            "HTTPS://lms.example/auth",
            f"the auth login URL 'HTTPS://lms.example/auth' {NOT_LOOPBACK}",
        ),
        _bad(
            "auth-login-url", f"{ISSUER}/auth#top", f"the auth login URL '{ISSUER}/auth#top' must not have a #fragment"
        ),
        _bad(
            "auth-login-url",
            "https://admin:pw@lms.example/auth",
            "the auth login URL 'https://admin:pw@lms.example/auth' must not hold a user name or password",
        ),
        _bad("jwks-url", "http://10.0.0.5/jwks", f"the JWKS URL 'http://10.0.0.5/jwks' {NOT_LOOPBACK}"),
        _bad(
            "jwks-url", "https://lms.example:99999/jwks", "the JWKS URL 'https://lms.example:99999/jwks' is not a URL"
        ),
        _bad("jwks-url", "https://[::1/jwks", "the JWKS URL 'https://[::1/jwks' is not a URL"),
        _bad("jwks-url", "https://lms example/jwks", "the JWKS URL 'https://lms example/jwks' is not a URL"),
    ],
)
async def test_a_bad_field_is_a_usage_error_naming_the_option_and_writes_nothing(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str], argv: list[str], refusal: str
) -> None:
    result = await smartedu(settings, capsys, "add", *argv)
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("usage: smartedu lti add") and refusal in result.err, result.err
    assert await platforms(db) == [] and await tenants(db) == []


@pytest.mark.parametrize("host", ["127.0.0.1:8443", "127.0.0.9", "[::1]:8080", "localhost:9000"])
async def test_http_is_accepted_for_a_loopback_host(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    local = f"http://{host}"
    argv = _moodle(issuer=local, auth_login_url=f"{local}/auth", jwks_url=f"{local}/jwks")
    result = await smartedu(settings, capsys, "add", "--tenant", TENANT, *argv)
    assert result.code == 0, result.err
    assert [(row["issuer"], row["jwks_url"]) for row in await platforms(db)] == [(local, f"{local}/jwks")]


async def test_a_registered_issuer_and_client_id_is_refused_unless_update(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await smartedu(settings, capsys, "add", "--tenant", TENANT, *MOODLE)).code == 0
    [before] = await platforms(db)
    moved = _moodle(jwks_url=f"{ISSUER}/keys.json")
    again = await smartedu(settings, capsys, "add", "--tenant", TENANT, *moved)
    assert again == Result(
        1,
        "",
        f"smartedu lti add: this issuer and client id are registered already (platform {before['id']} of "
        f"tenant {TENANT!r}); add --update to replace its deployment id and URLs\n",
    )
    assert await platforms(db) == [before]

    updated = await smartedu(settings, capsys, "add", "--tenant", TENANT, *moved, "--update")
    assert updated == Result(
        0,
        f"updated platform {before['id']} of tenant {TENANT!r}: JWKS URL {ISSUER}/mod/lti/certs.php -> "
        f"{ISSUER}/keys.json\n",
        "",
    )
    assert await platforms(db) == [{**before, "jwks_url": f"{ISSUER}/keys.json"}]
    same = await smartedu(settings, capsys, "add", "--tenant", TENANT, *moved, "--update", "--json")
    assert (same.json()["status"], same.json()["id"]) == ("unchanged", before["id"])

    # --update to every deployment; and an --update of a pair not registered yet registers it.
    widened = [*moved[:4], "--any-deployment", *moved[6:]]
    assert (await smartedu(settings, capsys, "add", "--tenant", TENANT, *widened, "--update")).out.startswith(
        f"updated platform {before['id']} of tenant {TENANT!r}: deployment id 1 -> any"
    )
    assert (await platforms(db))[0]["deployment_id"] is None
    other = await smartedu(settings, capsys, "add", "--tenant", TENANT, *_moodle(client_id="second"), "--update")
    assert other.code == 0 and other.out.startswith("registered platform")
    assert len(await platforms(db)) == 2


async def test_update_never_moves_a_platform_to_another_tenant(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await smartedu(settings, capsys, "add", "--tenant", TENANT, *MOODLE)).code == 0
    [before] = await platforms(db)
    taken = await smartedu(settings, capsys, "add", "--tenant", "school-z", *MOODLE, "--update")
    assert taken.code == 1 and taken.err == (
        f"smartedu lti add: this issuer and client id are registered for another tenant, {TENANT!r} (platform "
        f"{before['id']}); remove that registration first to move it\n"
    )
    # All or nothing: the tenant it would have created is not there either.
    assert await platforms(db) == [before] and await tenants(db) == [TENANT]


async def test_show_and_remove_find_only_the_tenants_own_platform(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    platform_id = (await smartedu(settings, capsys, "add", "--tenant", TENANT, *MOODLE, "--json")).json()["id"]
    await db.execute("INSERT INTO tenants (id) VALUES ('school-z')")
    for action in (["show"], ["remove", "--yes"]):
        refused = await smartedu(settings, capsys, *action, "--tenant", "school-z", str(platform_id))
        assert refused == Result(
            1,
            "",
            f"smartedu lti {action[0]}: tenant 'school-z' has no LTI platform {platform_id}: see `smartedu lti list`\n",
        )
    assert len(await platforms(db)) == 1
    for bad in ("0", "abc"):
        usage = await smartedu(settings, capsys, "show", "--tenant", TENANT, bad)
        assert usage.code == 2 and f"argument ID: must be a positive integer, got {bad!r}" in usage.err

    removed = await smartedu(settings, capsys, "remove", "--tenant", TENANT, str(platform_id), "--yes")
    assert removed.code == 0 and removed.out.endswith(f"removed platform {platform_id} of tenant {TENANT!r}\n")
    assert await platforms(db) == [] and await tenants(db) == [TENANT, "school-z"]
    gone = await smartedu(settings, capsys, "remove", "--tenant", TENANT, str(platform_id), "--yes")
    assert gone.code == 1 and f"has no LTI platform {platform_id}" in gone.err


async def test_a_missing_database_is_one_line(
    services: Services, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = replace(settings, database_url=with_database(services.database_url, "smartedu_no_such_database"))
    result = await smartedu(missing, capsys, "list")
    assert result.code == 1 and result.out == "" and result.err.startswith("smartedu lti list: database error: ")
    assert "smartedu_no_such_database" in result.err and len(result.err.splitlines()) == 1


async def test_remove_asks_first_when_run_as_a_command(
    services: Services,
    settings: Settings,
    db: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    platform_id = (await smartedu(settings, capsys, "add", "--tenant", TENANT, *MOODLE, "--json")).json()["id"]
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "REDIS_CLUSTER_URLS")}
    env.update(DATABASE_URL=services.database_url, SMARTEDU_DATA_DIR=str(tmp_path / "data"))
    command = [sys.executable, "-m", "server", "lti", "remove", "--tenant", TENANT, str(platform_id)]

    def answer(text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, input=text, capture_output=True, text=True, env=env, timeout=60)

    declined = await asyncio.to_thread(answer, "n\n")
    assert declined.returncode == 1 and declined.stderr == "nothing removed\n", declined
    assert f"platform {platform_id} of tenant {TENANT!r}\n  issuer:          {ISSUER}\n" in declined.stdout
    assert "Remove this platform?" in declined.stdout and len(await platforms(db)) == 1

    confirmed = await asyncio.to_thread(answer, "y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert f"removed platform {platform_id} of tenant {TENANT!r}" in confirmed.stdout
    assert await platforms(db) == []
    assert not (tmp_path / "data").exists()  # a DATABASE_URL: nothing embedded was started


def fake_platform_args(platform: FakePlatform, jwks_path: str = "/jwks") -> list[str]:
    """`lti add`'s arguments for the fake LMS of test_lti.py."""
    issuer = platform.issuer
    return [
        *("--tenant", TENANT, "--issuer", issuer, "--client-id", CLIENT_ID, "--deployment-id", DEPLOYMENT),
        *("--auth-login-url", f"{issuer}/auth", "--jwks-url", f"{issuer}{jwks_path}"),
    ]


async def test_a_platform_registered_with_the_command_launches_the_tutor(
    serve: Serve,
    settings: Settings,
    db: asyncpg.Connection,
    aiohttp_server: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    platform = FakePlatform()
    platform.server = await aiohttp_server(platform.app())
    added = await smartedu(
        settings,
        capsys,
        "add",
        *fake_platform_args(platform),
        "--json",
    )
    lti = Lti(await serve(), platform, added.json()["id"], db)

    target, window = await lti.launch_ok()
    course = f"lti-{lti.platform_id}-c-101"
    assert target.startswith(f"/embed?course={course}&tenant={TENANT}#") and window == "same"
    claims = lti.verify(fragment(target)["token"])
    assert (claims.sub, claims.tenant, claims.courses) == (f"lti:{lti.platform_id}:user-42", TENANT, (course,))
    sock = await lti.server.connect({"token": fragment(target)["token"], "course_id": course})
    assert sock.frames[0]["course_title"] == "Algebra I"
    await sock.close()
    shown = await smartedu(settings, capsys, "show", "--tenant", TENANT, str(lti.platform_id))
    assert "  launches made:   1 course, 1 user\n" in shown.out

    # Removed: a login made before is refused at its launch, and a new one at login; what it made stays.
    state, nonce = await lti.login()
    removed = await smartedu(settings, capsys, "remove", "--tenant", TENANT, str(lti.platform_id), "--yes")
    assert removed.code == 0 and "  launches made:   1 course, 1 user (they stay)\n" in removed.out
    refused = await lti.launch(platform.id_token(nonce), state)
    assert refused.status == 401 and "no longer registered" in await refused.text()
    login = await lti.server.client.get("/lti/login", params=lti.login_params(), allow_redirects=False)
    assert login.status == 400
    assert await db.fetchval("SELECT count(*) FROM courses WHERE id = $1", course) == 1


async def test_check_registers_only_a_key_set_that_serves_signing_keys(
    settings: Settings, db: asyncpg.Connection, aiohttp_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    platform = FakePlatform()
    platform.server = await aiohttp_server(platform.app())

    async def add(jwks_path: str, *extra: str) -> Result:
        return await smartedu(settings, capsys, "add", *fake_platform_args(platform, jwks_path), "--check", *extra)

    # A mistyped URL, a key set that redirects, one that is down, one with no signing key: one line on stderr,
    # exit 1, nothing written.
    refused = await add("/jwsk")
    assert refused.code == 1 and refused.out == "", refused
    url = f"{platform.issuer}/jwsk"
    assert (
        refused.err == f"smartedu lti add: the key set at {url} could not be read: HTTP 404; nothing was registered\n"
    )
    platform.jwks_answer = web.Response(status=301, headers={"Location": "/moved/jwks"})
    refused = await add("/jwks")
    assert refused.code == 1 and "redirects (HTTP 301) to /moved/jwks" in refused.err
    platform.jwks_answer, platform.jwks_down = None, True
    refused = await add("/jwks")
    assert refused.code == 1 and "could not be read: HTTP 503" in refused.err
    platform.jwks_answer = web.json_response({"keys": []})
    refused = await add("/jwks")
    assert refused.code == 1 and "has no RS256 signing key; nothing was registered" in refused.err
    assert await platforms(db) == [] and await tenants(db) == []

    platform.jwks_down, platform.jwks_answer = False, None
    kids = sorted(key["kid"] for key in platform.key_set()["keys"] if key["use"] == "sig")  # not its "enc" key
    added = await add("/jwks")
    assert added.code == 0, added.err
    assert added.out.startswith(f"key set: {len(kids)} RS256 signing key")
    assert ", ".join(kids) in added.out.splitlines()[0]
    assert [p["jwks_url"] for p in await platforms(db)] == [f"{platform.issuer}/jwks"]
    as_json = await add("/jwks", "--update", "--json")
    assert as_json.json()["signing_keys"] == kids and as_json.json()["status"] == "unchanged"
