"""Benchmark plumbing: PostgreSQL/Redis for a run, server/floor/NGINX processes, /proc readings, py-spy.

Everything started here is owned by one `ExitStack`-style object and stopped in `finally` blocks; child
processes also get SIGTERM from the kernel if the benchmark process dies (PR_SET_PDEATHSIG), so a
killed `make bench` leaves nothing running. Every load targets loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import importlib.util
import ipaddress
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import orjson

ROOT = Path(__file__).resolve().parent.parent
# The code under test: the working tree, or a commit exported by `export_code` (so that other people's
# half-finished edits in the working tree do not end up in the numbers).
_code: dict[str, str] = {"dir": str(ROOT), "label": "working tree"}


def code_dir() -> Path:
    return Path(_code["dir"])


def code_label() -> str:
    return str(_code["label"])


@contextlib.contextmanager
def export_code(ref: str | None, directory: Path | None = None) -> Iterator[Path]:
    """Use the working tree (ref None), `git archive REF` unpacked in a temporary directory, or a copy of the
    project in `directory` (for A/B experiments with a change that is not committed)."""
    if directory is not None:
        if not (directory / "server" / "__main__.py").exists():
            raise BenchError(f"{directory} does not hold the project (no server/__main__.py)")
        previous = dict(_code)
        _code.update(dir=str(directory.resolve()), label=f"copy in {directory.name}/")
        try:
            yield directory
        finally:
            _code.update(previous)
        return
    if ref is None:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        _code.update(dir=str(ROOT), label=f"working tree at {commit}" + (" with uncommitted changes" if dirty else ""))
        yield ROOT
        return
    commit = _git("rev-parse", "--short", ref)
    if not commit:
        raise BenchError(f"unknown git ref {ref!r}")
    with tempfile.TemporaryDirectory(prefix="smartedu-bench-code-") as tmp:
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        previous = dict(_code)
        _code.update(dir=tmp, label=f"commit {commit}")
        try:
            yield Path(tmp)
        finally:
            _code.update(previous)


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        if done.returncode == 0:
            return done.stdout.strip()
    return ""
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
JWT_SECRET_BYTES = 48


class BenchError(RuntimeError):
    """Something the benchmark needs did not work (a server did not start, a tool is missing)."""


# -- small utilities -------------------------------------------------------------------------------------


def check_loopback(url: str) -> None:
    """Refuse any target outside 127.0.0.0/8, ::1 and localhost: benchmarks never leave the machine."""
    host = (urlsplit(url).hostname or "").strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise BenchError(f"refusing non-loopback target {url!r}")


def raise_file_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE towards `needed` (up to the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, p50, p90, p99, max of raw samples (nearest-rank)."""
    if not values:
        return {"count": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))]

    return {
        "count": n,
        "mean": sum(ordered) / n,
        "min": ordered[0],
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """min / median / max over runs (None entries are ignored)."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return {"min": None, "median": None, "max": None}
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
    return {"min": present[0], "median": median, "max": present[-1]}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    free = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        free = subprocess.run(["free", "-g"], capture_output=True, text=True, timeout=5).stdout.strip()
    versions: dict[str, str] = {}
    for name in ("aiohttp", "uvloop", "asyncpg", "redis", "orjson"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "code": code_label(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "free_g": free,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": versions,
    }


# -- /proc -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSample:
    at: float  # time.monotonic()
    cpu_s: float  # user + system CPU seconds so far
    rss_kb: int
    hwm_kb: int
    fds: int


def read_sample(pid: int) -> ProcessSample:
    """CPU seconds (utime + stime from /proc/PID/stat), RSS and its peak, open file descriptors."""
    at = time.monotonic()
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)
    rss_kb = hwm_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm_kb = int(line.split()[1])
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    return ProcessSample(at, cpu_s, rss_kb, hwm_kb, fds)


def read_machine() -> ProcessSample:
    """The whole machine as one pseudo-process: CPU seconds busy (all cores; /proc/stat), memory used."""
    at = time.monotonic()
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy_s = (sum(fields[:8]) - idle) / CLOCK_TICKS
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        info[name] = int(rest.split()[0])
    used_kb = info.get("MemTotal", 0) - info.get("MemAvailable", 0)
    return ProcessSample(at, busy_s, used_kb, used_kb, 0)


def pids_with(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (load generators started by this benchmark)."""
    found = []
    encoded = needle.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if encoded in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def cpu_cores(first: ProcessSample, last: ProcessSample) -> float:
    return (last.cpu_s - first.cpu_s) / max(last.at - first.at, 1e-9)


def children_of(pid: int) -> list[int]:
    """Direct children (NGINX workers of a master)."""
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


# -- processes -------------------------------------------------------------------------------------------

_libc: Any = None


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the benchmark process exits for any reason."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class ManagedProcess:
    """A child process with its own log file; `stop` sends `stop_signal`, then SIGKILL after a grace time."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGINT
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    stop_signal: int = signal.SIGINT,
    user: str | None = None,
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            list(argv), cwd=code_dir(), env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, start_new_session=True,
            user=user, group=user,
        )
    except BaseException:
        log.close()
        raise
    return ManagedProcess(name, popen, log_path, stop_signal, log)


def wait_http(url: str, process: ManagedProcess, timeout: float = 60.0, expect: int = 200) -> None:
    """Poll an HTTP URL until it answers `expect` (the process must stay alive meanwhile)."""
    check_loopback(url)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # loopback only, checked above
                if response.status == expect:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise BenchError(f"{process.name} not ready at {url} after {timeout:.0f} s ({last}):\n{process.tail()}")


def wait_port(port: int, process: ManagedProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise BenchError(f"{process.name} is not listening on {port} after {timeout:.0f} s:\n{process.tail()}")


# -- PostgreSQL and Redis --------------------------------------------------------------------------------


def _reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


@dataclass
class Backends:
    """Where PostgreSQL and Redis are: the machine's own when reachable, else the embedded ones."""

    admin_dsn: str  # a database to connect to for CREATE/DROP DATABASE
    redis_url: str
    postgres_kind: str
    redis_kind: str
    _embedded: Any = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def start(cls) -> Backends:
        use_pg = _reachable(PG_HOST, PG_PORT) and _pg_trust()
        use_redis = _reachable(REDIS_HOST, REDIS_PORT)
        embedded = tmp = None
        admin_dsn = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
        redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
        if not (use_pg and use_redis):
            from server.embedded import EmbeddedServices

            tmp = tempfile.TemporaryDirectory(prefix="smartedu-bench-")
            embedded = EmbeddedServices(Path(tmp.name))
            embedded.start(postgres=not use_pg, redis=not use_redis)
            if not use_pg:
                admin_dsn = with_database(embedded.database_url, "postgres")
            if not use_redis:
                redis_url = embedded.redis_url
        return cls(
            admin_dsn, redis_url, "system PostgreSQL 127.0.0.1:5432" if use_pg else "embedded PostgreSQL",
            "system Redis 127.0.0.1:6379" if use_redis else "embedded Redis", embedded, tmp,
        )

    def versions(self) -> dict[str, str]:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            redis_version = str(client.info("server").get("redis_version"))
        finally:
            client.close()
        return {"postgres": str(_scalar(self.admin_dsn, "SHOW server_version")), "redis": redis_version}

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @contextlib.contextmanager
    def database(self, label: str) -> Iterator[str]:
        """A fresh database `smartedu_bench_<ts>_<label>` for one run; dropped afterwards."""
        name = f"smartedu_bench_{int(time.time())}_{label}".lower()
        if not name.replace("_", "").isalnum():
            raise BenchError(f"bad database label {label!r}")
        asyncio.run(_admin(self.admin_dsn, f'CREATE DATABASE "{name}"'))
        # What earlier runs left dirty in shared buffers (10,000 users after capacity) is written now, not by
        # the checkpointer during this run, where its writes stall the WAL flushes every commit waits for.
        asyncio.run(_admin(self.admin_dsn, "CHECKPOINT"))
        os.sync()
        try:
            yield with_database(self.admin_dsn, name)
        finally:
            with contextlib.suppress(Exception):
                asyncio.run(_admin(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    @contextlib.contextmanager
    def redis_prefix(self, label: str) -> Iterator[str]:
        """A unique key prefix for one run; its keys are deleted afterwards."""
        prefix = f"smartedu-bench-{int(time.time())}-{os.urandom(3).hex()}-{label}:"
        try:
            yield prefix
        finally:
            with contextlib.suppress(Exception):
                delete_redis_prefix(self.redis_url, prefix)


# -- the disk under PostgreSQL, and a PostgreSQL without one -----------------------------------------------


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fsync_probe(directory: Path, seconds: float = 10.0, pause_s: float = 0.002) -> dict[str, Any]:
    """The latency of `fdatasync` after an 8 KB overwrite in `directory`, which is what each PostgreSQL commit
    waits for (the WAL flush): percentiles in ms over `seconds`, a write every `pause_s`."""
    fd, name = tempfile.mkstemp(prefix="fsync-probe-", dir=directory)
    block = os.urandom(8192)
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            os.pwrite(fd, block, 0)
            started = time.perf_counter()
            os.fdatasync(fd)
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(pause_s)
    finally:
        os.close(fd)
        os.unlink(name)
    ordered = sorted(latencies)
    return {
        "directory": str(directory), "seconds": seconds, "syncs": len(ordered),
        "p50_ms": _percentile(ordered, 0.5), "p99_ms": _percentile(ordered, 0.99),
        "p999_ms": _percentile(ordered, 0.999), "max_ms": ordered[-1],
        "over_20_ms": sum(1 for v in ordered if v > 20), "over_50_ms": sum(1 for v in ordered if v > 50),
    }


def postgres_data_directory(admin_dsn: str) -> Path | None:
    """Where the server keeps its data (needs a superuser, as the benchmarks' trust login is)."""
    try:
        return Path(str(_scalar(admin_dsn, "SHOW data_directory")))
    except Exception:
        return None


def _postgres_bindir(admin_dsn: str) -> Path:
    """The binaries of the same major version as the server at `admin_dsn` (Debian: /usr/lib/postgresql/N/bin)."""
    version = str(_scalar(admin_dsn, "SHOW server_version")).split(".")[0]
    for candidate in (Path(f"/usr/lib/postgresql/{version}/bin"), Path(f"/usr/pgsql-{version}/bin")):
        if (candidate / "initdb").exists():
            return candidate
    raise BenchError(f"no initdb of PostgreSQL {version} found (Debian: apt-get install postgresql-{version})")


@contextlib.contextmanager
def memory_postgres(admin_dsn: str, log_path: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster of the same version as the one at `admin_dsn`, with default settings
    (fsync on), whose data directory is on tmpfs (/dev/shm): every commit still flushes its WAL, but the
    flush does not wait for a disk. Yields its admin DSN; the cluster is deleted afterwards."""
    bindir = _postgres_bindir(admin_dsn)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        raise BenchError("/dev/shm (tmpfs) is not available")
    workdir = Path(tempfile.mkdtemp(prefix="smartedu-bench-pg-", dir=shm))
    user = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        import pwd

        user = "postgres"
        owner = pwd.getpwnam(user)
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    data = workdir / "data"
    process: ManagedProcess | None = None
    try:
        with log_path.open("ab") as log:
            subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120, check=True,
                user=user, group=user, cwd=workdir,
            )
        port = free_port()
        argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir),
                "-c", f"listen_addresses={PG_HOST}"]
        # SIGINT: PostgreSQL's fast shutdown.
        process = spawn("postgres-in-memory", argv, log_path, user=user)
        wait_port(port, process)
        dsn = f"postgresql://postgres@{PG_HOST}:{port}/postgres"
        deadline = time.monotonic() + 30
        while not _accepts(dsn):
            if time.monotonic() > deadline:
                raise BenchError(f"the in-memory PostgreSQL did not accept connections; see {log_path}")
            time.sleep(0.2)
        yield dsn
    except subprocess.SubprocessError as exc:
        raise BenchError(f"initdb failed ({exc}); see {log_path}") from exc
    finally:
        if process is not None:
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _accepts(dsn: str) -> bool:
    async def probe() -> bool:
        import asyncpg

        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except Exception:
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def _pg_trust() -> bool:
    return _accepts(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres")


def with_database(dsn: str, name: str) -> str:
    """The same server, another database (a socket directory in the query is kept)."""
    parts = urlsplit(dsn)
    return parts._replace(path=f"/{name}").geturl()


def _scalar(dsn: str, query: str) -> Any:
    """One value from one query, on a connection of its own."""
    async def fetch() -> Any:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(fetch())


async def _admin(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def delete_redis_prefix(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


# -- the server, the floor, NGINX ------------------------------------------------------------------------


def new_secret() -> str:
    return os.urandom(JWT_SECRET_BYTES).hex()


@dataclass
class ServerSpec:
    database_url: str
    redis_url: str
    redis_prefix: str
    secret: str
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    reply_words: int | None = 50
    replica_id: str = "bench-1"
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTEDU_", "GEMINI_", "OPENAI_"))}
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "SMARTEDU_REDIS_PREFIX": self.redis_prefix,
                "SMARTEDU_JWT_SECRET": self.secret,
                "SMARTEDU_AI": "offline",
                "SMARTEDU_HOST": "127.0.0.1",
                "SMARTEDU_PORT": str(port),
                "SMARTEDU_MESSAGES_PER_MINUTE": "1000000",
                "SMARTEDU_USER_DAILY_TOKENS": "0",
                "SMARTEDU_TENANT_DAILY_TOKENS": "0",
                "SMARTEDU_OFFLINE_TTFT_MS": f"{self.ttft_ms:g}",
                "SMARTEDU_OFFLINE_TOKENS_PER_S": f"{self.tokens_per_s:g}",
                "SMARTEDU_OFFLINE_REPLY_WORDS": str(self.reply_words or 0),
                "SMARTEDU_REPLICA_ID": self.replica_id,
                # Two replicas on one machine cannot share the metrics port; /metrics is not measured here.
                "SMARTEDU_METRICS_PORT": "0",
                "SMARTEDU_LOG_LEVEL": "INFO",
            }
        )
        env.update(self.extra_env)
        return env


def seed_demo(spec: ServerSpec, log_path: Path) -> None:
    """`smartedu seed-demo` against the run's database: tenant `demo`, course `algebra-1`."""
    with log_path.open("ab") as log:
        done = subprocess.run(
            # Run from the code under test (`python -c` puts the working directory first on sys.path).
            [sys.executable, "-c", "import sys; from server.__main__ import main; sys.exit(main(['seed-demo']))"],
            cwd=code_dir(), env=spec.env(0), stdout=log, stderr=subprocess.STDOUT,
            timeout=120, check=False,
        )
    if done.returncode != 0:
        raise BenchError(f"smartedu seed-demo failed ({done.returncode}); see {log_path}")


def start_server(spec: ServerSpec, port: int, log_path: Path, files: int = 20000) -> ManagedProcess:
    """`smartedu serve --no-seed` as its own process (its RSS and CPU are read from /proc)."""
    argv = [
        sys.executable, "-c",
        # The open-file limit is raised inside the server process itself, then the CLI runs as usual.
        "import resource, sys; s, h = resource.getrlimit(resource.RLIMIT_NOFILE); "
        f"n = {files} if h == resource.RLIM_INFINITY else min(h, {files}); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (max(s, n), h)); "
        "from server.__main__ import main; sys.exit(main(['serve', '--no-seed']))",
    ]
    process = spawn(f"server:{port}", argv, log_path, spec.env(port))
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", process, timeout=60)
    except BaseException:
        process.stop()
        raise
    return process


def start_floor(
    port: int, log_path: Path, tokens: int = 50, durable: tuple[str, str, str] | None = None
) -> ManagedProcess:
    """benchmarks/floor_server.py, or with `durable` (database URL, Redis URL, key prefix)
    benchmarks/durable_floor_server.py, as its own process."""
    script = code_dir() / "benchmarks" / ("durable_floor_server.py" if durable else "floor_server.py")
    argv = [sys.executable, str(script), "--port", str(port), "--tokens", str(tokens)]
    if durable:
        database_url, redis_url, prefix = durable
        argv += ["--database-url", database_url, "--redis-url", redis_url, "--prefix", prefix]
    process = spawn(f"{script.stem}:{port}", argv, log_path)
    try:
        wait_port(port, process)
    except BaseException:
        process.stop()
        raise
    return process


def start_nginx(workdir: Path, listen_port: int, upstreams: Sequence[int], round_robin: bool = False) -> ManagedProcess:
    """NGINX from deploy/nginx/render.py in front of loopback replicas, with its /ws limits raised.

    `round_robin` removes `ip_hash`: every benchmark socket comes from 127.0.0.1, so ip_hash would send
    them all to one replica and no answer would ever be resumed on the other one.
    """
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise BenchError("nginx is not installed (apt-get install -y nginx)")
    renderer = code_dir() / "deploy" / "nginx" / "render.py"
    spec = importlib.util.spec_from_file_location("smartedu_nginx_render", renderer)
    if spec is None or spec.loader is None:
        raise BenchError("cannot load deploy/nginx/render.py")
    render = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = render  # dataclasses look the module up while the class is built
    spec.loader.exec_module(render)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    user = None
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
    options = render.NginxOptions(
        upstreams=tuple(f"127.0.0.1:{port}" for port in upstreams),
        listen=f"127.0.0.1:{listen_port}",
        static_root=str(code_dir() / "static"),
        pid=str(workdir / "nginx.pid"),
        error_log=str(workdir / "error.log"),
        access_log=str(workdir / "access.log"),
        temp_dir=str(workdir / "tmp"),
        user=user,
        ws_conn_per_ip=60_000,
        ws_rate_per_second=60_000,
        ws_burst=60_000,
    )
    text: str = render.render(options)
    if round_robin:
        text = text.replace("        ip_hash;\n", "")
    (workdir / "nginx.conf").write_text(text)
    argv = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]
    process = spawn("nginx", argv, workdir / "nginx.out", stop_signal=signal.SIGQUIT)
    try:
        wait_http(f"http://127.0.0.1:{listen_port}/nginx-health", process, timeout=20)
    except BaseException:
        process.stop()
        raise
    return process


# -- the load tester and py-spy --------------------------------------------------------------------------


def run_loadtest(
    url: str,
    secret_file: Path,
    out: Path,
    args: Sequence[str],
    log_path: Path,
    timeout: float,
    during: tuple[float, Callable[[], object]] | None = None,
) -> dict[str, Any]:
    """`python -m server.loadtest` (= `smartedu loadtest`) as its own process; returns its JSON results.

    `during = (seconds, action)` runs `action` that long after the start, from this thread (children must
    be started from the main thread: PR_SET_PDEATHSIG fires when the thread that forked them ends).
    """
    check_loopback(url)
    argv = [
        sys.executable, "-m", "server.loadtest", "--url", url, "--jwt-secret-file", str(secret_file),
        "--quiet", "--out", str(out), *args, *_same_students(),
    ]
    with log_path.open("ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        process = subprocess.Popen(
            argv, cwd=code_dir(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        try:
            started = time.monotonic()
            if during is not None:
                delay, action = during
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(delay)
                if process.poll() is None:
                    action()
            process.wait(max(1.0, timeout - (time.monotonic() - started)))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    if not out.exists():
        raise BenchError(f"loadtest wrote no results (exit {process.returncode}); see {log_path}")
    results: dict[str, Any] = orjson.loads(out.read_bytes())
    results["exit_status"] = process.returncode
    return results


def _same_students() -> list[str]:
    """The same students in every step of a ladder, as the tables were measured: the load tester mints
    users of its own for every run unless told otherwise (an older one, under --ref, has no such option)."""
    return ["--subject-prefix", "loadtest"] if "--subject-prefix" in _loadtest_help(code_dir()) else []


@functools.cache
def _loadtest_help(directory: Path) -> str:
    """The load tester's --help in the code under test (which options it has)."""
    return subprocess.run(
        [sys.executable, "-m", "server.loadtest", "--help"], cwd=directory, capture_output=True, text=True,
        timeout=120, check=False,
    ).stdout


def loadtest_command(url: str, args: Sequence[str]) -> str:
    """The command line as a reader would type it."""
    return " ".join(["smartedu loadtest", "--url", url, "--jwt-secret-file secret.txt", *args, *_same_students()])


def py_spy_start(pid: int, duration: int, out: Path, log_path: Path) -> ManagedProcess | None:
    """py-spy record (raw collapsed stacks) in the background; None when py-spy is not installed."""
    py_spy = BIN / "py-spy"
    if not py_spy.exists():
        return None
    argv = [
        str(py_spy), "record", "--pid", str(pid), "--duration", str(duration), "--rate", "200",
        "--format", "raw", "--output", str(out), "--nonblocking",
    ]
    return spawn("py-spy", argv, log_path, stop_signal=signal.SIGINT)


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks, plus a grouping by area."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_samples[_short(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            inclusive[name] += count
        areas[_area(frames)] += count
    if total == 0:
        return {"samples": 0, "self": [], "inclusive": [], "areas": []}

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, 100.0 * count / total) for name, count in counter.most_common(n)]

    return {"samples": total, "self": share(self_samples, top), "inclusive": share(inclusive, top * 2),
            "areas": share(areas, 20)}


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (path/to/module.py)"; py-spy already shortens paths
    # to the package ("redis/asyncio/client.py", "asyncio/streams.py", "server/chat.py").
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})"


# Checked in order against each frame, innermost first; the first library that matches owns the sample.
_AREAS = (
    ("(asyncpg/", "PostgreSQL client (asyncpg)"),
    ("(redis/", "Redis client (redis-py)"),
    ("(aiohttp/web_ws", "WebSocket (aiohttp)"),
    ("(aiohttp/_websocket", "WebSocket (aiohttp)"),
    ("(aiohttp/http_websocket", "WebSocket (aiohttp)"),
    ("(aiohttp/", "aiohttp (HTTP, middleware)"),
    ("(aiohttp_session/", "aiohttp (HTTP, middleware)"),
    ("(prometheus_client/", "metrics (prometheus_client)"),
    ("(opentelemetry/", "tracing (OpenTelemetry)"),
    ("(logging/", "logging"),
    ("(jwt/", "JWT verification"),
    ("(ai/", "offline AI provider / prompt"),
    ("(server/", "SmartEdu code (server/, storage/, handlers/)"),
    ("(storage/", "SmartEdu code (server/, storage/, handlers/)"),
    ("(handlers/", "SmartEdu code (server/, storage/, handlers/)"),
)
# Standard-library plumbing is charged to whoever called it (redis-py's socket writes go through
# asyncio streams, every `async with` through contextlib, ...).
_PLUMBING = ("(asyncio/", "(contextlib.py", "(typing.py", "(functools.py", "(<string>", "(abc.py", "(enum.py")
_LOOP_LEAVES = ("Runner.run (", "BaseEventLoop.run_forever (", "BaseEventLoop.run_until_complete (")


def _area(frames: Sequence[str]) -> str:
    """The innermost frame outside standard-library plumbing decides the area of a sample."""
    if frames[-1].startswith(_LOOP_LEAVES):
        # uvloop runs its loop in C under Runner.run: polling, timers, transport callbacks, and also
        # waiting, which py-spy cannot tell apart from work there.
        return "event loop (uvloop's C loop; includes waiting for I/O)"
    for frame in reversed(frames):
        for needle, label in _AREAS:
            if needle in frame:
                return label
        if not any(p in frame for p in _PLUMBING):
            return "other libraries"
    return "asyncio (tasks, futures, locks)"
