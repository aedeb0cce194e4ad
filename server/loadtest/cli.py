"""`smartedu loadtest`: simulate students (and teachers) against a chat server and gate on the results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import math
import os
import random
import resource
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from rich.console import Console

from ..errors import ConfigError
from ..settings import max_token_lifetime
from .report import (
    ALL,
    THRESHOLD_OPTIONS,
    LiveProgress,
    apply_thresholds,
    build_results,
    describe_check,
    render_summary,
    thresholds_from_options,
    write_json,
    write_plot,
)
from .stats import LOAD_PHASES
from .student import (
    MAX_RATE,
    MAX_STUDENTS,
    MAX_TEACHERS,
    THINK_DISTRIBUTIONS,
    LoadConfig,
    LoadTestError,
    QuestionPool,
    ThinkTime,
    run_load,
)
from .target import is_loopback
from .tokens import (
    ROLES,
    TokenError,
    TokenMinter,
    TokenSource,
    minter_from_private_key,
    minter_from_secret,
    read_tokens_file,
)

log = logging.getLogger("smartedu.loadtest")

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_CRASHED = 4
EXIT_ABORTED = 130
MAX_DURATION = 24 * 3600.0
SECRET_ENV = "SMARTEDU_JWT_SECRET"
LIFETIME_ENV = "SMARTEDU_MAX_TOKEN_LIFETIME_S"  # read as the server reads it: tokens must fit its cap
DEFAULT_COURSE = "algebra-1"  # the demo school's course (`smartedu seed-demo`)

_EPILOG = f"""\
exit status: 0 when every threshold holds, 1 when one fails (each failure is printed), 2 on a usage error,
3 when --out or --plot could not be written (after the run; the summary is printed first), 4 when a
simulated user or another task of the load tester crashed (a bug: the results are incomplete), 130 when
aborted by a second Ctrl-C. The highest applicable status wins (4, then 3, then 1).

Only loopback targets (127.0.0.0/8, ::1, localhost) are allowed unless --allow-remote is given.
With neither --jwt-secret nor --jwt-private-key nor --tokens-file, the secret is read from ${SECRET_ENV}.

examples:
  smartedu loadtest --url ws://127.0.0.1:8080/ws --students 200 --duration 60 \\
      --jwt-secret-file .smartedu/jwt-secret
  smartedu loadtest --url ws://127.0.0.1:8080/ws --students 500 --rate 100 --duration 120 \\
      --max-error-rate 0.01 --max-p99-ack-ms 25 --max-p99-ttft-ms 500 --max-lost 0 \\
      --out results.json --plot latency.png
See docs/loadtest.md for every option and what each metric means.
"""


class UsageError(Exception):
    """A command line that cannot run; reported with exit status 2."""


# -- arguments -----------------------------------------------------------------------------------------


def _number(kind: Callable[[str], Any], raw: str) -> Any:
    try:
        value = kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    # nan slips through every comparison below and inf never ends a wait: neither can run.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {raw}")
    return value


def _bounded(kind: Callable[[str], Any], raw: str, maximum: float | None) -> Any:
    value = _number(kind, raw)
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {raw}")
    return value


def _positive(kind: Callable[[str], Any], maximum: float | None = None) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = _bounded(kind, raw, maximum)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {raw}")
        return value

    return parse


def _non_negative(kind: Callable[[str], Any], maximum: float | None = None) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = _bounded(kind, raw, maximum)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {raw}")
        return value

    return parse


def _seconds(sign: Callable[[Callable[[str], Any], float | None], Callable[[str], Any]]) -> Callable[[str], Any]:
    """A time in seconds, at most a day: longer waits would overflow some event loops' timers."""
    return sign(float, MAX_DURATION)


def _probability(raw: str) -> float:
    value: float = _number(float, raw)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {raw}")
    return value


def _subject_prefix(raw: str) -> str:
    if not 1 <= len(raw) <= 100 or not raw.isprintable() or raw != raw.strip():
        raise argparse.ArgumentTypeError("must be 1 to 100 printable characters, without surrounding spaces")
    return raw


def _lengths(raw: str) -> list[int]:
    try:
        values = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {raw!r}") from None
    if not values or any(v < 1 or v > 100_000 for v in values):
        raise argparse.ArgumentTypeError("lengths must be between 1 and 100000")
    return values


_METAVARS = {
    "url": "URL",
    "ca_file": "FILE",
    "questions": "FILE",
    "jwt_secret_file": "FILE",
    "tokens_file": "FILE",
    "teacher_tokens_file": "FILE",
    "duration": "SECONDS",
    "turn_timeout": "SECONDS",
    "connect_timeout": "SECONDS",
    "drain_timeout": "SECONDS",
    "ttl": "SECONDS",
    "interval": "SECONDS",
    "ramp_rate": "PER_S",
    "rate": "PER_S",
    "min_turns_per_s": "PER_S",
    "drop_probability": "P",
    "max_error_rate": "RATE",
    **{dest: "MS" for dest in THRESHOLD_OPTIONS if dest.endswith("_ms")},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartedu loadtest",
        description=(
            "Simulate students speaking WebSocket protocol v1 against a SmartEdu Tutor Chat server "
            "(directly or through NGINX) and measure connect, ack, first-token and answer latencies, "
            "throughput, errors and lost or duplicated text."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("target")
    target.add_argument(
        "--url", default="ws://127.0.0.1:8080/ws", help="ws:// or wss:// endpoint (default %(default)s)"
    )
    target.add_argument(
        "--allow-remote", action="store_true", help="allow a target outside 127.0.0.0/8, ::1 and localhost"
    )
    target.add_argument("--insecure", action="store_true", help="wss: do not verify the server certificate")
    target.add_argument("--ca-file", type=Path, help="wss: verify the server certificate against this CA bundle")
    target.add_argument(
        "--auth",
        choices=("hello", "header"),
        default="hello",
        help="send the JWT in the hello frame or in an Authorization: Bearer header (default %(default)s)",
    )
    target.add_argument(
        "--max-msg-size",
        type=_positive(int),
        default=1 << 20,
        metavar="BYTES",
        help="largest frame accepted from the server (default %(default)s; welcome carries 20 messages)",
    )
    target.add_argument("--compress", action="store_true", help="negotiate permessage-deflate (costs memory)")

    load = parser.add_argument_group("load")
    load.add_argument(
        "--students", type=_positive(int), default=10, help=f"simulated students, at most {MAX_STUDENTS} (default 10)"
    )
    load.add_argument("--teachers", type=_non_negative(int), default=0, help="teachers watching courses (default 0)")
    load.add_argument(
        "--duration", type=_seconds(_positive), default=30.0, help="seconds of load, ramp-up included (default 30)"
    )
    load.add_argument(
        "--ramp-rate", type=_positive(float), default=50.0, help="students started per second (default 50)"
    )
    load.add_argument(
        "--rate",
        type=_positive(float, MAX_RATE),
        help=f"open loop: questions per second in total (at most {MAX_RATE:,}), on a fixed schedule; "
        "without it: closed loop",
    )
    load.add_argument(
        "--think-time",
        type=_seconds(_non_negative),
        default=2.0,
        metavar="SECONDS",
        help="closed loop: mean pause after an answer (default 2.0)",
    )
    load.add_argument(
        "--think-dist",
        choices=THINK_DISTRIBUTIONS,
        default="exponential",
        help="think time distribution: exponential, uniform on [0, 2*mean], or constant (default exponential)",
    )
    questions = load.add_mutually_exclusive_group()
    questions.add_argument("--questions", type=Path, help="file of questions, one per line ('#' lines skipped)")
    questions.add_argument(
        "--question-lengths",
        type=_lengths,
        default=[40, 120],
        metavar="N,N,...",
        help="generate questions of these lengths in characters, picked uniformly (default 40,120)",
    )
    load.add_argument(
        "--course",
        action="append",
        dest="courses",
        metavar="ID",
        help="course id (repeat for several; default 'algebra-1', the demo course); conversation k uses course k",
    )
    load.add_argument(
        "--conversations",
        type=_positive(int),
        default=1,
        help="conversations per student, one per course, visited in turn (default 1)",
    )
    load.add_argument(
        "--turns-per-conversation",
        type=_positive(int),
        default=5,
        help="questions before moving to the next conversation (default 5)",
    )
    load.add_argument(
        "--drop-probability",
        type=_probability,
        default=0.0,
        help="chance per question of dropping the socket after the first token and resuming (default 0)",
    )
    load.add_argument(
        "--check-text",
        type=_probability,
        default=1.0,
        metavar="P",
        help="chance per answer that its text is kept and compared with the committed text at the end, "
        "through the history frame (the last 5 per conversation; default 1)",
    )
    load.add_argument(
        "--turn-timeout",
        type=_seconds(_positive),
        default=60.0,
        help="seconds before an answer counts as failed (default %(default)g)",
    )
    load.add_argument(
        "--connect-timeout",
        type=_seconds(_positive),
        default=10.0,
        help="upgrade + welcome timeout in seconds (default %(default)g)",
    )
    load.add_argument(
        "--drain-timeout",
        type=_seconds(_non_negative),
        default=10.0,
        help="after --duration, seconds to wait for answers in flight (default 10)",
    )
    load.add_argument("--seed", type=int, help="random seed for think times, questions and drops")

    tokens = parser.add_argument_group("tokens")
    tokens.add_argument(
        "--jwt-secret",
        metavar="SECRET",
        help=f"HS256 secret (visible to ps: prefer --jwt-secret-file or ${SECRET_ENV})",
    )
    tokens.add_argument("--jwt-secret-file", type=Path, help="file holding the HS256 secret")
    tokens.add_argument(
        "--jwt-private-key", type=Path, metavar="PEM", help="RSA (RS256) or EC P-256 (ES256) private key"
    )
    tokens.add_argument("--tokens-file", type=Path, help="student JWTs, one per line, used in turn")
    tokens.add_argument("--teacher-tokens-file", type=Path, help="teacher JWTs, one per line")
    tokens.add_argument(
        "--tenant", metavar="ID", default="demo", help="tid claim (default %(default)s, the demo school)"
    )
    tokens.add_argument("--role", choices=ROLES, default="student", help="role claim of the students' tokens")
    tokens.add_argument(
        "--subject-prefix",
        metavar="PREFIX",
        type=_subject_prefix,
        help="minted tokens' sub is PREFIX-student-N / PREFIX-teacher-N (default loadtest-<random id of "
        "this run>: every run and every load generator gets users and conversations of its own)",
    )
    tokens.add_argument("--ttl", type=_positive(float), default=3600.0, help="token lifetime in seconds (default 3600)")
    tokens.add_argument("--issuer", metavar="ISS", help="iss claim, when the server checks it")
    tokens.add_argument("--audience", metavar="AUD", help="aud claim, when the server checks it")

    gate = parser.add_argument_group("thresholds (exit status 1 when one fails)")
    help_texts = {
        "max_error_rate": "largest error rate, 0..1 (failed, refused and unfinished turns and failed connects)",
        "max_p99_connect_ms": "largest p99 of the WebSocket upgrade",
        "max_p99_welcome_ms": "largest p99 of hello -> welcome",
        "max_p99_ack_ms": "largest p99 of question -> ack",
        "max_p99_ttft_ms": "largest p99 of question -> first token",
        "max_p99_done_ms": "largest p99 of question -> done",
        "max_lost": "most lost tokens (gaps in offsets, or text short of done.length)",
        "max_duplicated": "most duplicated tokens (an offset received twice)",
        "max_disconnects": "most unexpected disconnects",
        "max_resume_misses": "most reconnects the server could not resume",
        "max_refused": "most questions the server refused (rate_limited, quota_exceeded, retryable ai_unavailable)",
        "max_unexpected_frames": "most frames for no answer of this student (e.g. another user's, on a shared token)",
        "max_text_mismatches": "most answers whose text as streamed differs from the committed text (--check-text)",
        "min_turns_per_s": "fewest completed answers per second",
    }
    for dest in THRESHOLD_OPTIONS:
        flag = "--" + dest.replace("_", "-")
        kind = (
            _probability
            if dest == "max_error_rate"
            else _non_negative(int)
            if dest
            in (
                "max_lost",
                "max_duplicated",
                "max_disconnects",
                "max_resume_misses",
                "max_refused",
                "max_unexpected_frames",
                "max_text_mismatches",
            )
            else _non_negative(float)
        )
        gate.add_argument(flag, dest=dest, type=kind, help=help_texts[dest])
    gate.add_argument(
        "--gate-phase",
        choices=(ALL, *LOAD_PHASES),
        default=ALL,
        help="phase the thresholds apply to (default %(default)s: the whole run)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, metavar="JSON", help="write the results as JSON")
    output.add_argument("--plot", type=Path, metavar="PNG", help="write latency over time and distributions as PNG")
    output.add_argument("--interval", type=_seconds(_positive), default=1.0, help="time series interval (default 1 s)")
    output.add_argument("--quiet", action="store_true", help="no live progress and no tables; failures still print")
    output.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="JSON log lines on stderr from this level (default %(default)s)",
    )
    for action in parser._actions:
        if action.metavar is None and action.type is not None and action.choices is None:
            action.metavar = _METAVARS.get(action.dest, "N")
    return parser


# -- validation ------------------------------------------------------------------------------------------


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse anything but ws/wss, and any host outside loopback unless explicitly allowed."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise UsageError(f"--url is not a valid URL ({exc}): {url!r}") from None
    if parts.scheme not in ("ws", "wss"):
        raise UsageError(f"--url must start with ws:// or wss://, got {url!r}")
    if not host:
        raise UsageError(f"--url has no host: {url!r}")
    try:
        _ = parts.port
    except ValueError:
        raise UsageError(f"--url has a bad port: {url!r}") from None
    if allow_remote or is_loopback(host):
        return
    raise UsageError(
        f"refusing to load {host}: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed "
        "without --allow-remote"
    )


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            raise UsageError(
                f"{needed} sockets need more open files than the limit of {soft}: raise it (ulimit -n) "
                "or use fewer --students"
            )


def _ssl_setting(args: argparse.Namespace) -> ssl.SSLContext | bool:
    if args.insecure:
        return False
    if args.ca_file is not None:
        try:
            return ssl.create_default_context(cafile=str(args.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load --ca-file {args.ca_file}: {exc}") from None
    return True


def _warn(message: str) -> None:
    print(f"smartedu loadtest: warning: {message}", file=sys.stderr)


def _minter(args: argparse.Namespace, courses: Sequence[str]) -> tuple[TokenMinter | None, str]:
    common: dict[str, Any] = {
        "tenant": args.tenant,
        "courses": courses,
        "ttl": args.ttl,
        "issuer": args.issuer,
        "audience": args.audience,
    }
    if args.jwt_private_key is not None:
        minter = minter_from_private_key(args.jwt_private_key, **common)
        return minter, f"private-key:{minter.algorithm}"
    secret: str | None = args.jwt_secret
    if secret is None and args.jwt_secret_file is not None:
        try:
            secret = args.jwt_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read --jwt-secret-file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--jwt-secret-file {args.jwt_secret_file} is not UTF-8 text") from None
    if secret is None and args.tokens_file is None:
        secret = os.environ.get(SECRET_ENV) or None
    if secret is None:
        return None, "none"
    return minter_from_secret(secret, **common), "secret:HS256"


def _check_output(option: str, path: Path) -> None:
    """Refuse an output file that cannot be written before the run, not after it."""
    resolved = path.resolve()
    if resolved.is_dir():
        raise UsageError(f"{option}: {path} is a directory, not a file")
    if not resolved.parent.is_dir():
        raise UsageError(f"{option}: directory {resolved.parent} does not exist")
    if resolved.exists() and not os.access(resolved, os.W_OK):
        raise UsageError(f"{option}: {path} is not writable")
    if not resolved.exists() and not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: directory {resolved.parent} is not writable")


@dataclass(frozen=True)
class Prepared:
    args: argparse.Namespace
    config: LoadConfig
    summary: dict[str, Any]


def server_token_lifetime() -> int:
    """The server's token lifetime cap, from the same variable (its default when unset)."""
    try:
        return max_token_lifetime(os.environ)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def prepare(args: argparse.Namespace) -> Prepared:
    """Turn parsed arguments into a run configuration; raises UsageError naming the bad option."""
    check_target(args.url, args.allow_remote)
    if args.students > MAX_STUDENTS:
        raise UsageError(f"--students is capped at {MAX_STUDENTS} per process: run several load generators")
    if args.teachers > MAX_TEACHERS:
        raise UsageError(f"--teachers is capped at {MAX_TEACHERS}")
    if args.duration > MAX_DURATION:
        raise UsageError(f"--duration is capped at {MAX_DURATION:.0f} s")
    if args.ttl < args.duration + args.drain_timeout:
        raise UsageError("--ttl is shorter than the run: tokens would expire during it")
    cap = server_token_lifetime()
    if args.ttl > cap:
        raise UsageError(
            f"--ttl {args.ttl:g} exceeds {LIFETIME_ENV} ({cap} s): the server refuses tokens that live longer; "
            f"shorten the run, or raise {LIFETIME_ENV} on the server and here"
        )
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            _check_output(option, path)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib (pip install '.[loadtest]')")
    courses = tuple(dict.fromkeys(args.courses or [DEFAULT_COURSE]))
    rng = random.Random(args.seed)
    pool = (
        QuestionPool.from_file(args.questions)
        if args.questions is not None
        else QuestionPool.generated(args.question_lengths, rng)
    )
    minter, signing = _minter(args, courses)
    # Users of their own per run: two generators (or runs) minting the same sub would share conversations.
    prefix = args.subject_prefix or f"loadtest-{secrets.token_hex(4)}"
    if args.tokens_file is not None:
        student_tokens = read_tokens_file(args.tokens_file)
        if len(student_tokens) < args.students:
            _warn(
                f"{len(student_tokens)} tokens for {args.students} students: students sharing a token share "
                "its user's conversation, and see each other's frames (unexpected_frames)"
            )
        students = TokenSource("student", f"{prefix}-student", tokens=student_tokens)
        token_kind = "tokens-file"
    elif minter is not None:
        students = TokenSource(args.role, f"{prefix}-student", minter=minter)
        token_kind = signing
    else:
        raise UsageError(
            f"no tokens: give --jwt-secret(-file), --jwt-private-key or --tokens-file (or set ${SECRET_ENV})"
        )
    teachers: TokenSource | None = None
    if args.teacher_tokens_file is not None:
        teachers = TokenSource("teacher", f"{prefix}-teacher", tokens=read_tokens_file(args.teacher_tokens_file))
    elif minter is not None:
        teachers = TokenSource("teacher", f"{prefix}-teacher", minter=minter)
    if args.teachers and teachers is None:
        raise UsageError("--teachers needs a signing key or --teacher-tokens-file")
    config = LoadConfig(
        url=args.url,
        students=args.students,
        duration=args.duration,
        ramp_rate=args.ramp_rate,
        courses=courses,
        questions=pool,
        student_tokens=students,
        teacher_tokens=teachers,
        teachers=args.teachers,
        rate=args.rate,
        think=ThinkTime(args.think_time, args.think_dist),
        conversations=args.conversations,
        turns_per_conversation=args.turns_per_conversation,
        drop_probability=args.drop_probability,
        turn_timeout=args.turn_timeout,
        connect_timeout=args.connect_timeout,
        drain_timeout=args.drain_timeout,
        auth_in_header=args.auth == "header",
        max_msg_size=args.max_msg_size,
        compress=args.compress,
        ssl=_ssl_setting(args),
        seed=args.seed,
        interval=args.interval,
        allow_remote=args.allow_remote,
        check_text=args.check_text,
    )
    config.validate()
    _raise_file_limit(args.students + args.teachers + 64)
    # What went into the run, for the results file: never a secret or a token.
    summary: dict[str, Any] = {
        "url": args.url,
        "mode": "open" if args.rate is not None else "closed",
        "students": args.students,
        "teachers": args.teachers,
        "duration_s": args.duration,
        "ramp_rate": args.ramp_rate,
        "ramp_up_s": round(args.students / args.ramp_rate, 3),
        "rate": args.rate,
        "think_time_s": args.think_time if args.rate is None else None,
        "think_dist": args.think_dist if args.rate is None else None,
        "questions": str(args.questions) if args.questions is not None else {"lengths": args.question_lengths},
        "courses": list(courses),
        "conversations": args.conversations,
        "turns_per_conversation": args.turns_per_conversation,
        "drop_probability": args.drop_probability,
        "check_text": args.check_text,
        "turn_timeout_s": args.turn_timeout,
        "drain_timeout_s": args.drain_timeout,
        "tenant": args.tenant,
        "role": args.role,
        "tokens": token_kind,
        "subject_prefix": prefix if args.tokens_file is None else None,
        "auth": args.auth,
        "seed": args.seed,
    }
    return Prepared(args, config, summary)


# -- running -----------------------------------------------------------------------------------------


class _JsonLogFormatter(logging.Formatter):
    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (it may be swapped, e.g. by test capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("smartedu.loadtest")
    for handler in list(logger.handlers):
        if getattr(handler, "_loadtest", False):
            logger.removeHandler(handler)
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(_JsonLogFormatter())
    handler._loadtest = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


async def execute(prepared: Prepared, *, handle_signals: bool = False) -> int:
    """Run the load, report, and return the exit status."""
    args = prepared.args
    console = Console(file=sys.stdout)
    live_enabled = not args.quiet and console.is_terminal
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_installed = False
    if handle_signals and threading.current_thread() is threading.main_thread():
        # First Ctrl-C ends the run early and still reports; a second one aborts.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, _stop_or_abort, loop, stop)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            signals_installed = True
    started_at = _now_iso()
    wall_start = time.monotonic()
    try:
        with LiveProgress(console, args.duration, args.students, live_enabled) as progress:
            stats = await run_load(prepared.config, on_tick=progress.tick if live_enabled else None, stop=stop)
    finally:
        if signals_installed:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
    results = build_results(stats, prepared.summary, started_at, _now_iso())
    results["wall_time_s"] = round(time.monotonic() - wall_start, 3)
    thresholds = thresholds_from_options({dest: getattr(args, dest) for dest in THRESHOLD_OPTIONS})
    checked = apply_thresholds(results, thresholds, args.gate_phase)
    counters = results["phases"][ALL]["counters"]
    crashes = counters.get("student_crashes", 0) + counters.get("task_crashes", 0)
    if crashes:
        results["passed"] = False
    # The summary first: a file that cannot be written must not cost the run's results.
    if not args.quiet:
        render_summary(console, results)
    failed = [item for item in checked if not item["passed"]]
    for item in failed:
        print(f"loadtest: threshold failed: {describe_check(item)}", file=sys.stderr)
    unwritten = 0
    outputs: list[tuple[str, str, Path | None, Callable[[Path], None]]] = [
        ("results", "--out", args.out, lambda path: write_json(path, results)),
        ("plot", "--plot", args.plot, lambda path: write_plot(path, stats)),
    ]
    for label, option, path, write in outputs:
        if path is None:
            continue
        try:
            write(path)
        except (OSError, ValueError) as exc:
            unwritten += 1
            print(f"smartedu loadtest: error: cannot write {option} {path}: {exc}", file=sys.stderr)
        else:
            if not args.quiet:
                console.print(f"{label}: {path}")
    if crashes:
        print(
            f"loadtest: {crashes} task(s) of the load tester crashed (see the log): the results are incomplete",
            file=sys.stderr,
        )
        return EXIT_CRASHED
    if unwritten:
        return EXIT_OUTPUT
    return EXIT_THRESHOLD if failed else EXIT_OK


def _stop_or_abort(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    if stop.is_set():
        loop.remove_signal_handler(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return
    stop.set()


def _parse(argv: list[str] | None) -> Prepared | int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return prepare(args)
    except (UsageError, LoadTestError, TokenError) as exc:
        print(f"smartedu loadtest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


async def amain(argv: list[str] | None = None) -> int:
    """Like `main`, on the running event loop (for embedding and tests)."""
    prepared = _parse(argv)
    if isinstance(prepared, int):
        return prepared
    return await execute(prepared)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    prepared = _parse(argv)
    if isinstance(prepared, int):
        return prepared
    coroutine: Coroutine[Any, Any, int] = execute(prepared, handle_signals=True)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            return runner.run(coroutine)
        except KeyboardInterrupt:
            print("smartedu loadtest: aborted", file=sys.stderr)
            return EXIT_ABORTED
