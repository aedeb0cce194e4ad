"""`smartedu cluster`: several replicas behind NGINX on one machine, sharing one PostgreSQL and one Redis.

The building blocks (`Replica`, `Nginx`, `replica_env`, `prepare_database`) also run the cluster tests in
tests/cluster, so what a developer tries by hand is what the tests prove.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from .auth import mint_token
from .embedded import EmbeddedError, EmbeddedServices, jwt_secret
from .errors import ConfigError
from .settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
RENDER_SCRIPT = REPO_ROOT / "deploy" / "nginx" / "render.py"
STATIC_ROOT = REPO_ROOT / "static"
# Debian and Ubuntu install nginx in sbin, which a normal user's PATH often lacks.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
NGINX_MISSING = "nginx is not installed; install it: apt-get install nginx"
READY_TIMEOUT_S = 60.0


class ClusterError(RuntimeError):
    """A part of the cluster could not start or stop; the message says which one and where its log is."""


def find_nginx() -> str | None:
    """The nginx binary on PATH or in the usual sbin directories, or None."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which("nginx", path=search)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when a GET of `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def replica_env(
    base: Mapping[str, str],
    *,
    replica_id: str,
    database_url: str,
    redis_url: str,
    jwt_secret: str | None,
    allowed_origins: Sequence[str],
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one `smartedu serve` replica: shared services, secret and origins, its own id."""
    env = dict(base)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        SMARTEDU_REPLICA_ID=replica_id,
        SMARTEDU_ALLOWED_ORIGINS=",".join(dict.fromkeys(allowed_origins)),
    )
    if jwt_secret is not None:
        env["SMARTEDU_JWT_SECRET"] = jwt_secret
    if extra:
        env.update(extra)
    return env


@dataclass
class Replica:
    """One `smartedu serve` subprocess on a fixed port, logging to its own file."""

    replica_id: str
    port: int
    env: dict[str, str] = field(repr=False)  # holds the database URL and the JWT secret
    log_path: Path
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "server", "serve", "--no-seed", "--host", self.host, "--port", str(self.port),
        ]

    def start(self) -> None:
        """Start the process (in its own session, so a terminal's Ctrl-C reaches only the supervisor)."""
        if self.running:
            raise ClusterError(f"{self.replica_id} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until `/ready` answers 200; raise ClusterError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.returncode
            if self.process is None or code is not None:
                raise ClusterError(
                    f"{self.replica_id} exited with code {code} before it was ready; see {self.log_path}:\n"
                    + tail(self.log_path)
                )
            if http_ok(self.url + "/ready"):
                return
            time.sleep(0.1)
        raise ClusterError(f"{self.replica_id} was not ready within {timeout:.0f} s; see {self.log_path}")

    def send_signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if the process still runs after `timeout` seconds."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        """SIGKILL: no drain, no commit; what a crashed machine looks like to the others."""
        self.send_signal(signal.SIGKILL)
        return self.wait(10)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (drain), then SIGKILL if it has not exited within `timeout` seconds."""
        if not self.running:
            return self.returncode
        self.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code if code is not None else self.kill()


def stop_replicas(replicas: Sequence[Replica], timeout: float) -> dict[str, int | None]:
    """SIGTERM every replica at once, then wait for each (SIGKILL after `timeout`)."""
    for replica in replicas:
        replica.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: dict[str, int | None] = {}
    for replica in replicas:
        codes[replica.replica_id] = replica.stop(max(0.1, deadline - time.monotonic()))
    return codes


@dataclass
class Nginx:
    """NGINX in front of the replicas, with its configuration, pid, logs and temp files under `prefix`."""

    binary: str
    prefix: Path
    port: int
    upstreams: Sequence[str]
    host: str = "127.0.0.1"
    static_root: Path = STATIC_ROOT
    render_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def render(self) -> Path:
        """Write nginx.conf with deploy/nginx/render.py (the same template docker-compose uses)."""
        if not RENDER_SCRIPT.is_file():
            raise ClusterError(f"{RENDER_SCRIPT} is missing; run the cluster from a source checkout")
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, str(RENDER_SCRIPT),
            "--listen", f"{self.host}:{self.port}",
            "--static-root", str(self.static_root.resolve()),
            "--pid", str(self.prefix / "nginx.pid"),
            "--error-log", str(self.error_log),
            "--access-log", str(self.prefix / "access.log"),
            "--temp-dir", str(self.prefix / "tmp"),
            "--output", str(self.conf_path),
            *self.render_args,
        ]
        for upstream in self.upstreams:
            args += ["--upstream", upstream]
        if os.geteuid() == 0:
            # A root master would otherwise run its workers as the compiled-in user, which may not be
            # able to read the static files or write the temp dir; NGINX ignores `user` for non-root.
            args += ["--user", pwd.getpwuid(os.geteuid()).pw_name]
        result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise ClusterError(f"rendering the NGINX configuration failed: {result.stderr.strip()}")
        return self.conf_path

    def _command(self, *extra: str) -> list[str]:
        # -e: the error log NGINX uses before it has read the configuration (else a system path).
        return [
            self.binary, "-p", str(self.prefix), "-c", str(self.conf_path), "-e", str(self.error_log),
            "-g", "daemon off;", *extra,
        ]

    def start(self, timeout: float = 15.0) -> None:
        """Render, check and start NGINX, then wait until it answers."""
        self.render()
        check = subprocess.run(self._command("-t", "-q"), capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise ClusterError(f"nginx -t rejected {self.conf_path}:\n{check.stderr.strip()}")
        with (self.prefix / "nginx.out").open("ab") as out:
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ClusterError(f"nginx exited at start; see {self.error_log}:\n{tail(self.error_log)}")
            if http_ok(self.url + "/nginx-health"):
                return
            time.sleep(0.05)
        raise ClusterError(f"nginx did not answer on {self.url} within {timeout:.0f} s; see {self.error_log}")

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGTERM closes proxied sockets at once; SIGQUIT would wait for them)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


async def prepare_database(database_url: str, *, seed: bool = True) -> None:
    """Apply migrations and (by default) create the demo school, once for all replicas."""
    from storage.postgres import Database, connect_pool
    from storage.seed import seed_demo

    pool = await connect_pool(database_url, min_size=1, max_size=2)
    try:
        db = Database(pool)
        await db.migrate()
        if seed:
            await seed_demo(db)
    finally:
        await pool.close()


@contextlib.contextmanager
def _terminal_interrupt_blocked() -> Iterator[None]:
    """Block SIGINT while starting children that stay in our process group (the embedded Redis).

    A blocked signal stays blocked across exec, so Ctrl-C in the terminal reaches only the supervisor,
    which then stops NGINX and the replicas before the services they still need while draining.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    print("smartedu cluster: already stopping, please wait", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartedu cluster",
        description="Run N replicas of the chat server behind NGINX (ip_hash) on this machine, sharing one "
        "PostgreSQL and one Redis: embedded ones under the data directory unless DATABASE_URL/REDIS_URL are "
        "set. Needs nginx on the machine. Ctrl-C stops everything (NGINX, then the replicas, then the "
        "embedded servers). Replicas read the same environment as `smartedu serve` (e.g. "
        "SMARTEDU_OFFLINE_TOKENS_PER_S, SMARTEDU_DRAIN_SECONDS).",
    )
    parser.add_argument(
        "--replicas", type=int, default=3, metavar="N", help="number of app replicas (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8088, metavar="PORT", help="port NGINX listens on (default %(default)s)"
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=9001,
        metavar="PORT",
        help="port of replica-1; replica-K listens on BASE_PORT+K-1 (default %(default)s)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface NGINX and the replicas listen on (default %(default)s)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="embedded PostgreSQL/Redis data, JWT secret, NGINX files and logs (default SMARTEDU_DATA_DIR "
        "or ./.smartedu; the same data `smartedu serve` uses, so do not run both at once)",
    )
    return parser


def _check_ports(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.replicas <= 64:
        parser.error("--replicas must be between 1 and 64")
    last = args.base_port + args.replicas - 1
    if not (1 <= args.port <= 65535 and args.base_port >= 1 and last <= 65535):
        parser.error("ports must be between 1 and 65535")
    if args.base_port <= args.port <= last:
        parser.error(f"--port {args.port} falls among the replica ports {args.base_port}-{last}")


def main(argv: list[str]) -> int:
    """`smartedu cluster --replicas N [--port 8088] [--base-port 9001] [--data-dir DIR]`."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_ports(parser, args)
    nginx_binary = find_nginx()
    if nginx_binary is None:
        print(f"smartedu cluster: {NGINX_MISSING}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        print(f"smartedu cluster: configuration error: {exc}", file=sys.stderr)
        return 2
    data_dir: Path = (args.data_dir or settings.data_dir).resolve()

    stack = contextlib.ExitStack()
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        code = _run(args, env, settings, data_dir, nginx_binary, stack)
    except KeyboardInterrupt:
        code = 0
    except (ClusterError, EmbeddedError, ConfigError) as exc:
        print(f"smartedu cluster: {exc}", file=sys.stderr)
        code = 1
    finally:
        for signum in previous:
            signal.signal(signum, _already_stopping)
        print("\nstopping NGINX, the replicas and the embedded servers...", file=sys.stderr, flush=True)
        stack.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("stopped", file=sys.stderr)
    return code


def _run(
    args: argparse.Namespace,
    env: dict[str, str],
    settings: Settings,
    data_dir: Path,
    nginx_binary: str,
    stack: contextlib.ExitStack,
) -> int:
    """Start everything in order, registering each stop on `stack`; then supervise until interrupted."""
    host: str = args.host
    database_url, redis_url = settings.database_url, settings.redis_url
    if database_url is None or redis_url is None:
        print(f"starting embedded PostgreSQL and Redis under {data_dir} ...", file=sys.stderr, flush=True)
        embedded = EmbeddedServices(data_dir)
        stack.callback(embedded.stop)
        with _terminal_interrupt_blocked():
            embedded.start(postgres=database_url is None, redis=redis_url is None)
        database_url = database_url or embedded.database_url
        redis_url = redis_url or embedded.redis_url
    secret = settings.jwt_secret
    if secret is None and settings.jwt_public_key is None:
        secret = jwt_secret(data_dir)
    asyncio.run(prepare_database(database_url))

    run_dir = data_dir / "cluster"
    public_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    origins = [*settings.allowed_origins, f"http://{public_host}:{args.port}", f"http://localhost:{args.port}"]
    drain_s = float(env.get("SMARTEDU_DRAIN_SECONDS") or 20)
    replicas = [
        Replica(
            replica_id=f"replica-{k}",
            port=args.base_port + k - 1,
            env=replica_env(
                env, replica_id=f"replica-{k}", database_url=database_url, redis_url=redis_url,
                jwt_secret=secret, allowed_origins=origins,
            ),
            log_path=run_dir / "logs" / f"replica-{k}.log",
            host=host,
        )
        for k in range(1, args.replicas + 1)
    ]
    stack.callback(stop_replicas, replicas, drain_s + 10)
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.wait_ready()
        print(f"{replica.replica_id} ready on {replica.url}", file=sys.stderr, flush=True)

    nginx = Nginx(
        nginx_binary, run_dir / "nginx", args.port, [f"{host}:{r.port}" for r in replicas], host=host
    )
    stack.callback(nginx.stop)
    nginx.start()
    _announce(settings, secret, nginx, replicas, f"http://{public_host}:{args.port}", run_dir / "logs")
    return _supervise(nginx, replicas)


def _announce(
    settings: Settings, secret: str | None, nginx: Nginx, replicas: Sequence[Replica], base: str, logs: Path
) -> None:
    from storage.seed import DEMO_COURSE, DEMO_STUDENT, DEMO_TEACHER, DEMO_TENANT

    lines = [
        f"\nSmartEdu cluster: {len(replicas)} replicas behind NGINX ({settings.ai_provider} tutor).\n",
        f"  NGINX:          {base}",
        *(f"  {r.replica_id + ':':<15} {r.url}  (pid {r.process.pid if r.process else '-'})" for r in replicas),
        f"  Logs:           {logs} (NGINX: {nginx.prefix})",
    ]
    if secret is not None:
        student = mint_token(
            secret, user=DEMO_STUDENT, tenant=DEMO_TENANT, role="student", name="Demo Student",
            ttl_s=settings.max_token_lifetime_s, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        )
        teacher = mint_token(
            secret, user=DEMO_TEACHER, tenant=DEMO_TENANT, role="teacher", name="Demo Teacher",
            courses=[DEMO_COURSE], ttl_s=settings.max_token_lifetime_s,
            issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        )
        lines += [
            "",
            f"  Student chat:   {base}/chat#course={DEMO_COURSE}&token={student}",
            "",
            f"  Teacher dashboard:  {base}/teacher#token={teacher}",
        ]
    lines += ["", "Press Ctrl-C to stop.\n"]
    print("\n".join(lines), flush=True)


def _supervise(nginx: Nginx, replicas: Sequence[Replica]) -> int:
    """Watch the children until interrupted; NGINX exiting ends the cluster, a replica exiting does not."""
    reported: set[str] = set()
    while True:
        time.sleep(0.5)
        if not nginx.running:
            code = nginx.process.poll() if nginx.process is not None else None
            print(f"smartedu cluster: nginx exited with code {code}; see {nginx.error_log}", file=sys.stderr)
            return 1
        for replica in replicas:
            if replica.replica_id not in reported and not replica.running:
                reported.add(replica.replica_id)
                print(
                    f"smartedu cluster: {replica.replica_id} exited with code {replica.returncode} "
                    f"(see {replica.log_path}); NGINX sends its clients to the others",
                    file=sys.stderr,
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
