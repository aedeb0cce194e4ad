"""`make bench`: every benchmark scenario, several runs each, raw JSON under benchmarks/results/ and
docs/benchmarks.md generated from them.

    python benchmarks/run_all.py                      # everything, 3 runs each (about an hour)
    python benchmarks/run_all.py --quick              # smaller and shorter, 1 run each (under 5 minutes)
    python benchmarks/run_all.py --scenarios throughput,floor --runs 5

Scenarios: capacity (10,000 idle sockets), throughput (open-loop turn rate ladder), throughput_tmpfs (the
same against a PostgreSQL whose data directory is in memory), class (1,000 students thinking 10 s),
class_tmpfs (the same in memory), fanout (one teacher watching 200 students), floor (throughput and class
against benchmarks/floor_server.py), durable_floor (the throughput ladder against
benchmarks/durable_floor_server.py, the floor plus the least durable work a turn needs), nginx (two
replicas behind NGINX), profile (py-spy during throughput and class). The server under test is a
separate `smartedu serve` process on a fresh database and Redis prefix per run; PostgreSQL and Redis are
the machine's own on 127.0.0.1 when reachable, else the embedded ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fanout import FanoutConfig, run_fanout
from benchmarks.harness import (
    ROOT,
    Backends,
    BenchError,
    ManagedProcess,
    ProcessSample,
    ServerSpec,
    children_of,
    code_label,
    export_code,
    free_port,
    fsync_probe,
    loadtest_command,
    machine_info,
    memory_postgres,
    new_secret,
    pids_with,
    postgres_data_directory,
    py_spy_start,
    read_machine,
    read_sample,
    run_loadtest,
    seed_demo,
    spread,
    start_floor,
    start_nginx,
    start_server,
    summarize_profile,
)
from benchmarks.idle_sockets import IdleConfig, run_idle

SCENARIOS = (
    "capacity", "throughput", "throughput_tmpfs", "class", "class_tmpfs", "fanout", "floor", "durable_floor", "nginx",
    "profile",
)
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the file is regenerated -->", "<!-- /notes -->"

# Targets from the load-testing issue.
TARGET_CONNECTIONS = 10_000
TARGET_KB_PER_CONNECTION = 30.0
TARGET_ACK_P99_MS = 25.0
TARGET_TURNS_PER_S = 300.0
TARGET_CLASS_ADDED_P99_MS = 20.0
TARGET_CLASS_CPU = 0.5
TARGET_CLASS_RSS_MB = 256.0
TARGET_FANOUT_P99_MS = 100.0
CLASS_TTFT_MS = 300.0
CLASS_TOKENS_PER_S = 40.0
REPLY_WORDS = 50
THROUGHPUT_RAMP_RATE = 50.0  # students started per second in each throughput step


@dataclass(frozen=True)
class Pacing:
    """The offline provider's timing for a run."""

    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    reply_words: int = REPLY_WORDS


ZERO_DELAY = Pacing()
PACED = Pacing(CLASS_TTFT_MS, CLASS_TOKENS_PER_S)


@dataclass(frozen=True)
class Plan:
    """Sizes and durations; `--quick` shrinks them."""

    runs: int
    idle_students: int = 10_000
    idle_rate: float = 150.0
    # Steps of 50 around the target, then wider ones until the replica fails: the ladder stops at its first
    # failing step, so a fast machine climbs the higher steps and a slow one never gets there. The floor's goes
    # on until the floor or the generator gives out (a ladder that never failed only bounds the limit).
    ladder: tuple[float, ...] = (100, 200, 250, 300, 350, 400, 500, 600, 800, 1000, 1200, 1400, 1600, 2000)
    floor_ladder: tuple[float, ...] = (400, 800, 1200, 1600, 2000, 2500, 3000, 4000, 5000, 6000)
    durable_ladder: tuple[float, ...] = (400, 600, 800, 1000, 1200, 1400, 1600, 2000, 2500, 3000)
    step_s: float = 20.0
    throughput_students: int = 200
    class_students: int = 1000
    class_duration_s: float = 60.0
    class_ramp_rate: float = 50.0
    fanout_students: int = 200
    fanout_duration_s: float = 25.0
    nginx_rate: float = 50.0
    nginx_step_s: float = 15.0
    nginx_students: int = 200
    nginx_class_s: float = 30.0
    cross_fanout_s: float = 10.0
    profile_s: int = 20
    fsync_probe_s: float = 15.0

    @classmethod
    def quick(cls, runs: int) -> Plan:
        return cls(
            runs=runs, idle_students=2000, ladder=(100, 200, 300), floor_ladder=(400, 1200),
            durable_ladder=(400, 800), step_s=8.0, throughput_students=100, class_students=300,
            class_duration_s=25.0, fanout_students=100, fanout_duration_s=12.0, nginx_rate=50.0,
            nginx_step_s=10.0, nginx_students=100, nginx_class_s=20.0,
            cross_fanout_s=8.0, profile_s=8, fsync_probe_s=5.0,
        )


# -- sampling processes while a load runs ---------------------------------------------------------------


@dataclass
class Sampler:
    """Reads /proc for some processes every `every` s in a thread; windows are chosen afterwards."""

    pids: dict[str, Callable[[], list[int]]]
    every: float = 0.5
    samples: list[tuple[float, dict[str, ProcessSample]]] = field(default_factory=list)
    # Per group: CPU seconds used since the first sample, and each process's CPU at the last sample. A group's
    # processes come and go (PostgreSQL backends, one load generator per step): summing their CPU as it
    # stands would drop when one exits, and a window across that would show negative cores.
    _used: dict[str, float] = field(default_factory=dict)
    _last: dict[str, dict[int, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._take()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._take()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._take()

    def _take(self) -> None:
        wall = time.time()
        taken: dict[str, ProcessSample] = {"machine": read_machine()}
        first = not self.samples
        for name, pids in self.pids.items():
            parts: dict[int, ProcessSample] = {}
            for pid in pids():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    parts[pid] = read_sample(pid)
            last = self._last.get(name, {})
            # A process seen before adds what it used since; one that appeared since the last sample adds all
            # it has used (it started meanwhile); the processes of the first sample are the baseline.
            self._used[name] = self._used.get(name, 0.0) + sum(
                max(0.0, p.cpu_s - last[pid]) if pid in last else (0.0 if first else p.cpu_s)
                for pid, p in parts.items()
            )
            self._last[name] = {pid: p.cpu_s for pid, p in parts.items()}
            if parts:
                readings = list(parts.values())
                taken[name] = ProcessSample(
                    readings[0].at, self._used[name], sum(p.rss_kb for p in readings),
                    sum(p.hwm_kb for p in readings), sum(p.fds for p in readings),
                )
        self.samples.append((wall, taken))

    def window(self, name: str, start: float, end: float) -> dict[str, float | None]:
        """CPU cores used and RSS (MB, max and last) of `name` between two wall-clock times."""
        inside = [(w, s[name]) for w, s in self.samples if start <= w <= end and name in s]
        if len(inside) < 2:
            return {"cpu_cores": None, "rss_max_mb": None, "rss_end_mb": None}
        first, last = inside[0][1], inside[-1][1]
        return {
            "cpu_cores": (last.cpu_s - first.cpu_s) / max(last.at - first.at, 1e-9),
            "rss_max_mb": max(s.rss_kb for _, s in inside) / 1024,
            "rss_end_mb": last.rss_kb / 1024,
        }


def _pids_of(pid: int) -> Callable[[], list[int]]:
    return lambda: [pid]


def _loadgen() -> list[int]:
    return pids_with("server.loadtest")


def _postgres_backends(database: str) -> Callable[[], list[int]]:
    """PostgreSQL backend processes serving one database (their CPU is the database's share)."""
    needle = f" {database} ".encode()

    def find() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if cmdline.startswith(b"postgres:") and needle in cmdline:
                    found.append(int(entry.name))
        return found

    return find


def _redis_pid(url: str) -> Callable[[], list[int]]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return lambda: [pid] if Path(f"/proc/{pid}").exists() else []


# -- Redis and PostgreSQL work counters -----------------------------------------------------------------


def redis_counts(url: str) -> dict[str, int]:
    """Calls per command since Redis started (commands run by scripts included), and the total."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        total = int(client.info("stats")["total_commands_processed"])
        memory = int(client.info("memory")["used_memory"])
    finally:
        client.close()
    counts = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    counts["_total"] = total
    counts["_used_memory_bytes"] = memory
    return counts


def pg_counts(admin_dsn: str, database: str) -> dict[str, int]:
    """Transactions and rows of one database (pg_stat_database; backends flush when they exit)."""
    import asyncio

    import asyncpg

    async def read() -> dict[str, int]:
        conn = await asyncpg.connect(admin_dsn)
        try:
            row = await conn.fetchrow(
                "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated,"
                " tup_deleted FROM pg_stat_database WHERE datname = $1",
                database,
            )
            wal = await conn.fetchrow("SELECT wal_records, wal_bytes FROM pg_stat_wal")
            size = await conn.fetchval("SELECT pg_database_size($1)", database)
        finally:
            await conn.close()
        out = {k: int(v) for k, v in dict(row or {}).items()}
        out["database_bytes"] = int(size or 0)
        if wal is not None:
            out["wal_records_cluster"] = int(wal["wal_records"])
            out["wal_bytes_cluster"] = int(wal["wal_bytes"])
        return out

    return asyncio.run(read())


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# -- one run's servers ----------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every scenario shares: where results go, the backends, the secret."""

    plan: Plan
    backends: Backends
    out: Path
    secret: str = field(default_factory=new_secret)

    @property
    def secret_file(self) -> Path:
        path = self.out / "jwt-secret.txt"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(self.secret + "\n")
        return path

    def log(self, name: str) -> Path:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        return self.out / "logs" / name

    def save(self, name: str, data: object) -> Path:
        path = self.out / name
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        return path

    @contextlib.contextmanager
    def servers(
        self, label: str, pacing: Pacing, replicas: int = 1
    ) -> Iterator[tuple[list[ManagedProcess], list[int], ServerSpec, str]]:
        """Fresh database + Redis prefix, seeded, with `replicas` servers; everything is removed afterwards."""
        with self.backends.database(label) as database_url, self.backends.redis_prefix(label) as prefix:
            spec = ServerSpec(
                database_url, self.backends.redis_url, prefix, self.secret,
                ttft_ms=pacing.ttft_ms, tokens_per_s=pacing.tokens_per_s, reply_words=pacing.reply_words,
            )
            seed_demo(spec, self.log(f"{label}-seed.log"))
            processes: list[ManagedProcess] = []
            ports: list[int] = []
            try:
                for index in range(replicas):
                    port = free_port()
                    replica = ServerSpec(**{**spec.__dict__, "replica_id": f"bench-{index + 1}"})
                    processes.append(start_server(replica, port, self.log(f"{label}-server{index + 1}.log")))
                    ports.append(port)
                yield processes, ports, spec, database_url.rsplit("/", 1)[1]
            finally:
                for process in processes:
                    code = process.stop()
                    if code not in (0, None, -signal.SIGINT):
                        print(f"  warning: {process.name} exited with {code}; see {process.log_path}", flush=True)


def _loadtest(
    bench: Bench,
    url: str,
    name: str,
    args: Sequence[str],
    sampler: Sampler | None,
    timeout: float,
    during: tuple[float, Callable[[], object]] | None = None,
) -> dict[str, Any]:
    """Run the load tester; attach the sampled CPU/RSS of the steady phase and the whole load."""
    out = bench.out / f"{name}.json"
    results = run_loadtest(url, bench.secret_file, out, args, bench.log(f"{name}.log"), timeout, during)
    ended = time.time()
    started = ended - float(results["wall_time_s"])
    results["command"] = loadtest_command(url, args)
    if sampler is not None:
        config = results["config"]
        ramp, duration = float(config["ramp_up_s"]), float(config["duration_s"])
        results["sampled"] = {
            name: {
                "steady": sampler.window(name, started + ramp, started + duration),
                "load": sampler.window(name, started, started + duration),
            }
            for name in (*sampler.pids, "machine")
        }
    return results


def _phase(results: dict[str, Any], phase: str = "steady") -> dict[str, Any]:
    phases: dict[str, dict[str, Any]] = results["phases"]
    return phases[phase] if phase in phases else phases["all"]


def _lat(results: dict[str, Any], metric: str, stat: str = "p99", phase: str = "steady") -> float | None:
    entry = _phase(results, phase)["latency_ms"].get(metric)
    if not entry or entry.get(stat) is None:
        return None
    return float(entry[stat])


def _counter(results: dict[str, Any], name: str, phase: str = "all") -> int:
    return int(_phase(results, phase)["counters"].get(name, 0))


def _slim(results: dict[str, Any]) -> dict[str, Any]:
    """What the summary keeps of a loadtest result (the full file stays next to it)."""
    keep: dict[str, Any] = {"command": results.get("command"), "exit_status": results.get("exit_status")}
    for phase in ("steady", "all"):
        if phase not in results["phases"]:
            continue
        data = results["phases"][phase]
        keep[phase] = {
            "latency_ms": {
                m: {k: v for k, v in s.items() if k != "hdr"} for m, s in data["latency_ms"].items() if s
            },
            "rates_per_s": data["rates_per_s"],
            "error_rate": data["error_rate"],
            "errors_by_code": data["errors_by_code"],
            "counters": {k: v for k, v in data["counters"].items() if v},
        }
    keep["sampled"] = results.get("sampled")
    return keep


# -- scenario 1: capacity -------------------------------------------------------------------------------


def scenario_capacity(bench: Bench, run: int) -> dict[str, Any]:
    plan = bench.plan
    label = f"cap{run}"
    with bench.servers(label, PACED) as (procs, ports, _, db):
        server = procs[0]
        # A few sockets first, so one-off lazy set-up is not charged to the 10,000.
        url = f"ws://127.0.0.1:{ports[0]}/ws"
        run_idle(IdleConfig(url, bench.secret, 20, 100.0, procs=1, settle=0.5), None)
        redis_before, pg_before = redis_counts(bench.backends.redis_url), pg_counts(bench.backends.admin_dsn, db)
        config = IdleConfig(url, bench.secret, plan.idle_students, plan.idle_rate, procs=2, settle=5.0, hold=5.0)
        result = run_idle(config, server.pid)
        redis_after = redis_counts(bench.backends.redis_url)
        server.stop()  # its backends exit and flush their statistics
        time.sleep(0.5)
        pg_after = pg_counts(bench.backends.admin_dsn, db)
    hellos = max(result["connected"], 1)
    result["redis_per_hello"] = {k: v / hellos for k, v in _delta(redis_after, redis_before).items()}
    result["pg_per_hello"] = {k: v / hellos for k, v in _delta(pg_after, pg_before).items()}
    result["command"] = (
        f"python benchmarks/idle_sockets.py --url ws://127.0.0.1:PORT/ws --jwt-secret-file secret.txt "
        f"--students {plan.idle_students} --rate {plan.idle_rate:g} --procs 2 --settle 5 --hold 5 --server-pid PID"
    )
    return result


# -- scenario 2: throughput ladder ---------------------------------------------------------------------


NOISY_SEND_LAG_MS = 10.0  # the load generator itself fell behind: the step measured the machine
NOISY_UNRELATED_CORES = 0.25  # other people's jobs took this much of the machine during the step


def _ladder(bench: Bench, url: str, name: str, ladder: Sequence[float], sampler: Sampler, pid_name: str,
            students: int, step_s: float) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for rate in ladder:
        step = _step(bench, url, name, rate, sampler, pid_name, students, step_s, attempt=1)
        if not step["passed"] and step["noisy"]:
            # A failure while the generator was starved or unrelated jobs took the cores says nothing about
            # the replica: the step is run once more and both attempts are reported.
            steps.append(step)
            step = _step(bench, url, name, rate, sampler, pid_name, students, step_s, attempt=2)
        steps.append(step)
        if not step["passed"]:
            break
    best = max((s["rate"] for s in steps if s["passed"]), default=0.0)
    return {"steps": steps, "max_turns_per_s": best, "command": steps[0]["detail"]["command"] if steps else None}


def _step(bench: Bench, url: str, name: str, rate: float, sampler: Sampler, pid_name: str, students: int,
          step_s: float, attempt: int) -> dict[str, Any]:
    # Each step is a new load-tester process whose students all say `hello` again (~5 ms of replica CPU
    # each): a slow ramp keeps that storm out of the steady phase, which is what the step measures.
    ramp_s = students / THROUGHPUT_RAMP_RATE
    args = [
        "--students", str(students), "--ramp-rate", f"{THROUGHPUT_RAMP_RATE:g}", "--rate", f"{rate:g}",
        "--duration", f"{step_s + ramp_s:g}", "--drain-timeout", "5", "--seed", "1", "--turn-timeout", "30",
    ]
    label = f"{name}-rate{rate:g}" + (f"-attempt{attempt}" if attempt > 1 else "")
    results = _loadtest(bench, url, label, args, sampler, step_s * 3 + 120)
    ack_p99 = _lat(results, "ack")
    steady = _phase(results)
    achieved = float(steady["rates_per_s"]["turns"])
    lost = _counter(results, "lost_tokens") + _counter(results, "duplicate_tokens")
    send_lag = _lat(results, "send_lag")
    attempted = _counter(results, "turns_attempted", "steady")
    completed = _counter(results, "turns_completed", "steady")
    # The load tester's ramp can start a little late, so the bar is the questions it actually asked in
    # the steady phase (all answered) and 90 % of the nominal rate.
    passed = (
        ack_p99 is not None and ack_p99 < TARGET_ACK_P99_MS and achieved >= 0.9 * rate
        and completed >= attempted and (steady["error_rate"] or 0) == 0 and lost == 0
    )
    sampled = results["sampled"]
    unrelated = _unrelated_cores(sampled)
    noisy = (send_lag or 0) > NOISY_SEND_LAG_MS or (unrelated or 0) > NOISY_UNRELATED_CORES
    worst = max((point[3] for point in results["timeseries"]["ack"] if point[3] is not None), default=None)
    print(
        f"    {name} rate {rate:g}/s{' (again)' if attempt > 1 else ''}: achieved {achieved:.1f}/s, p99 ack "
        f"{ack_p99 if ack_p99 is not None else float('nan'):.1f} ms, server "
        f"{(sampled[pid_name]['steady']['cpu_cores'] or 0):.2f} cores, send_lag p99 "
        f"{send_lag if send_lag is not None else float('nan'):.1f} ms, unrelated {unrelated or 0:.2f} cores"
        f" -> {'pass' if passed else 'FAIL'}{' (noisy)' if noisy and not passed else ''}",
        flush=True,
    )
    return {
        "rate": rate, "attempt": attempt, "passed": passed, "noisy": noisy, "achieved_turns_per_s": achieved,
        "ack_p99_ms": ack_p99, "ack_p50_ms": _lat(results, "ack", "p50"), "done_p99_ms": _lat(results, "done"),
        "worst_second_ack_p99_ms": worst, "send_lag_p99_ms": send_lag, "error_rate": steady["error_rate"],
        "lost_or_duplicated": lost, "frames_per_s": steady["rates_per_s"]["frames"],
        "turns": _counter(results, "turns_completed"), "hellos": _counter(results, "connects_ok"),
        "unrelated_cores": unrelated, "server": sampled[pid_name]["steady"], "detail": _slim(results),
    }


def _unrelated_cores(sampled: dict[str, Any]) -> float | None:
    steady = {name: (entry.get("steady") or {}).get("cpu_cores") for name, entry in sampled.items()}
    machine = steady.get("machine")
    if machine is None:
        return None
    ours = sum(float(v) for k, v in steady.items() if k != "machine" and v is not None)
    return max(0.0, float(machine) - ours)


@contextlib.contextmanager
def _measured(bench: Bench, label: str, pacing: Pacing) -> Iterator[tuple[str, Sampler, dict[str, Any]]]:
    """One server, with its CPU and RSS sampled (and its database's, Redis's and the generator's); yields its
    URL, the sampler and a dict that gets the run's Redis command and PostgreSQL counters (`redis_delta`,
    `pg_delta`) once the server has stopped."""
    deltas: dict[str, Any] = {}
    with bench.servers(label, pacing) as (procs, ports, _, db):
        pids = {
            "server": _pids_of(procs[0].pid), "postgres": _postgres_backends(db),
            "redis": _redis_pid(bench.backends.redis_url), "loadgen": _loadgen,
        }
        redis_before = redis_counts(bench.backends.redis_url)
        pg_before = pg_counts(bench.backends.admin_dsn, db)
        with Sampler(pids) as sampler:
            yield f"ws://127.0.0.1:{ports[0]}/ws", sampler, deltas
        redis_after = redis_counts(bench.backends.redis_url)
        procs[0].stop()  # its backends exit and flush their statistics
        time.sleep(0.5)
        pg_after = pg_counts(bench.backends.admin_dsn, db)
    deltas["redis_delta"] = _delta(redis_after, redis_before)
    deltas["pg_delta"] = _delta(pg_after, pg_before)


def scenario_throughput(bench: Bench, run: int, label: str = "") -> dict[str, Any]:
    plan = bench.plan
    label = label or f"tp{run}"
    with _measured(bench, label, ZERO_DELAY) as (url, sampler, deltas):
        result = _ladder(bench, url, label, plan.ladder, sampler, "server", plan.throughput_students, plan.step_s)
    result.update(deltas)
    result["turns"] = sum(s["turns"] for s in result["steps"])
    result["hellos"] = sum(s["hellos"] for s in result["steps"])
    return result


@contextlib.contextmanager
def _in_memory(bench: Bench, label: str) -> Iterator[Bench]:
    """The same bench against a PostgreSQL of the same version whose data directory is in memory: commits
    still flush their WAL, but not to this machine's disk, whose fsync tail (see Machine) shows in the p99
    `ack` on the machine's own PostgreSQL. What the replica and its round trips do, apart from the disk."""
    with memory_postgres(bench.backends.admin_dsn, bench.log(f"{label}-postgres.log")) as admin_dsn:
        backends = dataclasses.replace(
            bench.backends, admin_dsn=admin_dsn, postgres_kind="PostgreSQL with its data directory on tmpfs",
            _embedded=None, _tmp=None,
        )
        yield dataclasses.replace(bench, backends=backends)


def scenario_throughput_tmpfs(bench: Bench, run: int) -> dict[str, Any]:
    with _in_memory(bench, f"tpm{run}") as in_memory:
        return scenario_throughput(in_memory, run, f"tpm{run}")


def scenario_floor_throughput(bench: Bench, run: int) -> dict[str, Any]:
    plan = bench.plan
    port = free_port()
    # ack + 1 token frame + done per answer, like the full server with zero delay (all 50 words coalesce).
    floor = start_floor(port, bench.log(f"floor-tp{run}.log"), tokens=1)
    try:
        with Sampler({"floor": _pids_of(floor.pid), "loadgen": _loadgen}) as sampler:
            return _ladder(bench, f"ws://127.0.0.1:{port}/ws", f"floor-tp{run}", plan.floor_ladder, sampler,
                           "floor", plan.throughput_students, plan.step_s)
    finally:
        floor.stop()


def scenario_durable_floor(bench: Bench, run: int) -> dict[str, Any]:
    """The throughput ladder against the durable floor, on the in-memory PostgreSQL that section 2b's ladder of
    ours uses, so that the two differ only in what the server does."""
    plan = bench.plan
    label = f"dfl{run}"
    with _in_memory(bench, label) as in_memory, in_memory.backends.database(label) as database_url, \
            in_memory.backends.redis_prefix(label) as prefix:
        port = free_port()
        redis_url = in_memory.backends.redis_url
        durable = start_floor(port, bench.log(f"{label}.log"), tokens=1, durable=(database_url, redis_url, prefix))
        try:
            database = database_url.rsplit("/", 1)[1]
            pids = {"durable_floor": _pids_of(durable.pid), "postgres": _postgres_backends(database),
                    "redis": _redis_pid(redis_url), "loadgen": _loadgen}
            redis_before = redis_counts(redis_url)
            with Sampler(pids) as sampler:
                result = _ladder(bench, f"ws://127.0.0.1:{port}/ws", f"durable-floor-tp{run}", plan.durable_ladder,
                                 sampler, "durable_floor", plan.throughput_students, plan.step_s)
            result["redis_delta"] = _delta(redis_counts(redis_url), redis_before)
        finally:
            durable.stop()
    result["turns"] = sum(s["turns"] for s in result["steps"])
    return result


# -- scenario 3: a realistic class ----------------------------------------------------------------------


def _class_args(plan: Plan, students: int, duration: float, extra: Sequence[str] = ()) -> list[str]:
    return [
        "--students", str(students), "--ramp-rate", f"{plan.class_ramp_rate:g}", "--think-time", "10",
        "--duration", f"{duration:g}", "--drain-timeout", "10", "--seed", "1", *extra,
    ]


def _class_summary(results: dict[str, Any], pid_name: str, ttft_ms: float) -> dict[str, Any]:
    steady = _phase(results)
    ttft = _lat(results, "ttft")
    sampled = results["sampled"][pid_name]
    return {
        "ack_p99_ms": _lat(results, "ack"), "ack_p50_ms": _lat(results, "ack", "p50"),
        "ttft_p99_ms": ttft, "ttft_p50_ms": _lat(results, "ttft", "p50"),
        "added_ttft_p99_ms": ttft - ttft_ms if ttft is not None else None,
        "done_p99_ms": _lat(results, "done"), "welcome_p99_ms": _lat(results, "welcome", phase="all"),
        "turns_per_s": steady["rates_per_s"]["turns"], "frames_per_s": steady["rates_per_s"]["frames"],
        "error_rate": _phase(results, "all")["error_rate"],
        "lost": _counter(results, "lost_tokens"), "duplicated": _counter(results, "duplicate_tokens"),
        "cpu_cores": sampled["steady"]["cpu_cores"], "cpu_cores_with_ramp": sampled["load"]["cpu_cores"],
        "rss_max_mb": sampled["load"]["rss_max_mb"], "rss_end_mb": sampled["load"]["rss_end_mb"],
        "others": {k: v["steady"] for k, v in results["sampled"].items() if k != pid_name},
        "detail": _slim(results),
    }


def scenario_class(bench: Bench, run: int, label: str = "") -> dict[str, Any]:
    plan = bench.plan
    label = label or f"class{run}"
    with _measured(bench, label, PACED) as (url, sampler, deltas):
        results = _loadtest(bench, url, label, _class_args(plan, plan.class_students, plan.class_duration_s),
                            sampler, plan.class_duration_s * 2 + 120)
    summary = _class_summary(results, "server", CLASS_TTFT_MS)
    summary["command"] = results["command"]
    summary.update(deltas)
    summary["turns"] = _counter(results, "turns_completed")
    summary["hellos"] = _counter(results, "connects_ok")
    return summary


def scenario_class_tmpfs(bench: Bench, run: int) -> dict[str, Any]:
    with _in_memory(bench, f"classm{run}") as in_memory:
        return scenario_class(in_memory, run, f"classm{run}")


def scenario_floor_class(bench: Bench, run: int) -> dict[str, Any]:
    plan = bench.plan
    port = free_port()
    floor = start_floor(port, bench.log(f"floor-class{run}.log"), tokens=REPLY_WORDS)
    try:
        with Sampler({"floor": _pids_of(floor.pid), "loadgen": _loadgen}) as sampler:
            results = _loadtest(bench, f"ws://127.0.0.1:{port}/ws", f"floor-class{run}",
                                _class_args(plan, plan.class_students, plan.class_duration_s), sampler,
                                plan.class_duration_s * 2 + 120)
    finally:
        floor.stop()
    summary = _class_summary(results, "floor", 0.0)
    summary["command"] = results["command"]
    return summary


# -- scenario 4: teacher fan-out -----------------------------------------------------------------------


def scenario_fanout(bench: Bench, run: int) -> dict[str, Any]:
    plan = bench.plan
    with bench.servers(f"fan{run}", PACED) as (procs, ports, _, _db):
        url = f"ws://127.0.0.1:{ports[0]}/ws"
        with Sampler({"server": _pids_of(procs[0].pid)}) as sampler:
            started = time.time()
            result = run_fanout(FanoutConfig(url, url, bench.secret, plan.fanout_students, plan.fanout_duration_s,
                                             think_time=5.0, seed=run))
        result["server"] = sampler.window("server", started, started + plan.fanout_duration_s)
    result["command"] = (
        f"python benchmarks/fanout.py --url ws://127.0.0.1:PORT/ws --jwt-secret-file secret.txt "
        f"--students {plan.fanout_students} --duration {plan.fanout_duration_s:g} --think-time 5 --seed {run}"
    )
    return result


# -- scenario 6: NGINX and two replicas ----------------------------------------------------------------


@contextlib.contextmanager
def _nginx(bench: Bench, name: str, ports: Sequence[int], round_robin: bool) -> Iterator[tuple[ManagedProcess, int]]:
    listen = free_port()
    process = start_nginx(bench.out / name, listen, ports, round_robin=round_robin)
    try:
        yield process, listen
    finally:
        process.stop()


def _replica_spread(bench: Bench, name: str) -> dict[str, int]:
    """How many /ws upgrades each replica got, from NGINX's access log."""
    counts: dict[str, int] = {}
    log = bench.out / name / "access.log"
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if entry.get("uri") == "/ws":
                    for upstream in str(entry.get("upstream", "")).split(", "):
                        counts[upstream] = counts.get(upstream, 0) + 1
    return counts


def scenario_nginx(bench: Bench, run: int) -> dict[str, Any]:
    plan = bench.plan
    out: dict[str, Any] = {}
    # (a) turn throughput at a moderate rate, NGINX exactly as rendered (ip_hash).
    with bench.servers(f"ngx{run}a", ZERO_DELAY, replicas=2) as (procs, ports, _, _db), \
            _nginx(bench, f"nginx{run}a", ports, round_robin=False) as (nginx, listen):
        pids = {"replicas": lambda: [p.pid for p in procs], "nginx": lambda: [nginx.pid, *children_of(nginx.pid)]}
        with Sampler(pids) as sampler:
            students = plan.throughput_students
            args = [
                "--students", str(students), "--ramp-rate", str(students * 2), "--rate", f"{plan.nginx_rate:g}",
                "--duration", f"{plan.nginx_step_s + 0.5:g}", "--drain-timeout", "5", "--seed", "1",
                "--max-lost", "0", "--max-duplicated", "0", "--max-error-rate", "0",
            ]
            results = _loadtest(bench, f"ws://127.0.0.1:{listen}/ws", f"ngx{run}a", args, sampler,
                                plan.nginx_step_s * 3 + 120)
        out["throughput"] = {
            "rate": plan.nginx_rate, "turns_per_s": _phase(results)["rates_per_s"]["turns"],
            "ack_p99_ms": _lat(results, "ack"), "done_p99_ms": _lat(results, "done"),
            "error_rate": _phase(results, "all")["error_rate"], "lost": _counter(results, "lost_tokens"),
            "duplicated": _counter(results, "duplicate_tokens"), "passed": results["exit_status"] == 0,
            "replicas_cpu": results["sampled"]["replicas"]["steady"]["cpu_cores"],
            "nginx_cpu": results["sampled"]["nginx"]["steady"]["cpu_cores"],
            "upgrades_by_replica": _replica_spread(bench, f"nginx{run}a"), "command": results["command"],
            "detail": _slim(results),
        }
    # (b) a smaller class with drops and resumes; round robin, so a resume often lands on the other replica.
    with bench.servers(f"ngx{run}b", PACED, replicas=2) as (procs, ports, _, _db), \
            _nginx(bench, f"nginx{run}b", ports, round_robin=True) as (nginx, listen):
        pids = {"replicas": lambda: [p.pid for p in procs], "nginx": lambda: [nginx.pid, *children_of(nginx.pid)]}
        extra = ["--drop-probability", "0.1", "--max-lost", "0", "--max-duplicated", "0", "--max-error-rate", "0"]
        with Sampler(pids) as sampler:
            results = _loadtest(bench, f"ws://127.0.0.1:{listen}/ws", f"ngx{run}b",
                                _class_args(plan, plan.nginx_students, plan.nginx_class_s, extra), sampler,
                                plan.nginx_class_s * 2 + 120)
        out["class"] = {
            "students": plan.nginx_students, "turns_per_s": _phase(results)["rates_per_s"]["turns"],
            "ack_p99_ms": _lat(results, "ack"), "ttft_p99_ms": _lat(results, "ttft"),
            "error_rate": _phase(results, "all")["error_rate"], "lost": _counter(results, "lost_tokens"),
            "duplicated": _counter(results, "duplicate_tokens"), "drops": _counter(results, "drops"),
            "resumes_ok": _counter(results, "resumes_ok"), "resume_misses": _counter(results, "resume_misses"),
            "passed": results["exit_status"] == 0, "upgrades_by_replica": _replica_spread(bench, f"nginx{run}b"),
            "replicas_cpu": results["sampled"]["replicas"]["steady"]["cpu_cores"],
            "nginx_cpu": results["sampled"]["nginx"]["steady"]["cpu_cores"], "command": results["command"],
            "detail": _slim(results),
        }
        # (c) cross-replica fan-out: students on replica 1, their teacher on replica 2 (Redis pub/sub between).
        fan = run_fanout(FanoutConfig(
            f"ws://127.0.0.1:{ports[0]}/ws", f"ws://127.0.0.1:{ports[1]}/ws", bench.secret,
            students=min(100, plan.fanout_students), duration=plan.cross_fanout_s, think_time=5.0,
            seed=run,
        ))
        out["cross_replica_fanout"] = fan
    return out


# -- profiles -------------------------------------------------------------------------------------------


def scenario_profile(bench: Bench, rate: float) -> dict[str, Any]:
    """py-spy on the server during a throughput step and during a class (separate runs, not measured)."""
    plan = bench.plan
    out: dict[str, Any] = {}
    with bench.servers("proftp", ZERO_DELAY) as (procs, ports, _, _db):
        raw = bench.out / "profile-throughput.txt"
        students = plan.throughput_students
        ramp_s = students / THROUGHPUT_RAMP_RATE
        args = ["--students", str(students), "--ramp-rate", f"{THROUGHPUT_RAMP_RATE:g}", "--rate", f"{rate:g}",
                "--duration", f"{plan.profile_s + ramp_s + 4:g}", "--drain-timeout", "5", "--seed", "1"]
        spy = py_spy_start(procs[0].pid, plan.profile_s, raw, bench.log("py-spy-throughput.log"))
        if spy is None:
            return {"error": "py-spy is not installed"}
        try:
            results = _loadtest(bench, f"ws://127.0.0.1:{ports[0]}/ws", "profile-throughput", args, None, 180)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.popen.wait(plan.profile_s + 30)
            spy.stop()
        out["throughput"] = {"rate": rate, "summary": summarize_profile(raw), "samples_per_s": 200,
                             "seconds": plan.profile_s, "command": results["command"]}
    with bench.servers("profclass", PACED) as (procs, ports, _, _db):
        raw = bench.out / "profile-class.txt"
        ramp = plan.class_students / plan.class_ramp_rate
        holder: dict[str, ManagedProcess | None] = {}

        def start_spy() -> None:
            holder["spy"] = py_spy_start(procs[0].pid, plan.profile_s, raw, bench.log("py-spy-class.log"))

        try:
            results = _loadtest(
                bench, f"ws://127.0.0.1:{ports[0]}/ws", "profile-class",
                _class_args(plan, plan.class_students, ramp + plan.profile_s + 6), None, 300,
                during=(ramp + 3.0, start_spy),
            )
        finally:
            spy = holder.get("spy")
            if spy is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.popen.wait(plan.profile_s + 30)
                spy.stop()
        out["class"] = {"summary": summarize_profile(raw), "samples_per_s": 200, "seconds": plan.profile_s,
                        "command": results["command"]}
    return out


# -- aggregation and the document ----------------------------------------------------------------------


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _mmm(values: Sequence[float | None], digits: int = 1) -> str:
    s = spread(values)
    return f"{_fmt(s['min'], digits)} / {_fmt(s['median'], digits)} / {_fmt(s['max'], digits)}"


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    if met:
        return "**met**"
    if higher_is_better:
        return f"**missed** by {(target - value) / target * 100:.0f} %"
    if value > 2 * target:
        return f"**missed**: {value / target:,.1f} times the target"
    return f"**missed** by {(value - target) / target * 100:.0f} %"


def _median(values: Sequence[float | None]) -> float | None:
    return spread(values)["median"]


def render_doc(summary: dict[str, Any], notes: str) -> str:
    machine = summary.get("machine", {})
    backends = summary.get("backends", {})
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python benchmarks/run_all.py`) from the raw results in "
        "`benchmarks/results/` (not committed); every number below was measured on the machine described "
        "here. Each scenario ran several times: cells show **min / median / max** over the runs. How to "
        "run, and what each scenario does: [benchmarks/README.md](../benchmarks/README.md). Sizing built "
        "on these numbers: [capacity.md](capacity.md).",
        "",
        "## Machine",
        "",
        f"- `nproc`: {machine.get('nproc')}; CPU: {machine.get('cpu_model')}; Python {machine.get('python')}, "
        f"Linux {machine.get('kernel')}",
        f"- packages: {', '.join(f'{k} {v}' for k, v in machine.get('packages', {}).items())}",
        f"- PostgreSQL {backends.get('postgres')} ({backends.get('postgres_kind')}), "
        f"Redis {backends.get('redis')} ({backends.get('redis_kind')})",
        f"- code under test: {machine.get('code')}",
        *_fsync_lines(machine.get("fsync")),
        "- The server, PostgreSQL, Redis, NGINX and the load generators all share these cores: every "
        "figure is a lower bound of what a replica does on a machine of its own.",
        "",
        "```",
        f"$ free -g\n{machine.get('free_g', '')}",
        "```",
        "",
    ]
    updated = summary.get("updated", {})
    scen = summary.get("scenarios", {})

    if "capacity" in scen:
        runs = scen["capacity"]["runs"]
        per_conn = [r.get("server", {}).get("rss_per_connection_kb") for r in runs]
        connected = [float(r["connected"]) for r in runs]
        all_connected = all(r["failed"] == 0 and r["connected"] >= TARGET_CONNECTIONS for r in runs)
        lines += [
            "## 1. Capacity: idle authenticated sockets on one replica",
            "",
            f"_Measured {updated.get('capacity', '?')}, {len(runs)} runs._ Each socket upgrades, sends "
            "`hello {token, course_id}` (a new student each: user upsert, new conversation, presence, the "
            "replica's entry in the conversation's nodes set) and waits for `welcome`, on an open-loop "
            "schedule; then all stay idle.",
            "",
            "| metric | min / median / max | target | verdict |",
            "|---|---|---|---|",
            f"| sockets connected (of {runs[0]['students']:,}) | {_mmm(connected, 0)} | "
            f"{TARGET_CONNECTIONS:,}, 0 failures | "
            f"{'**met**' if all_connected else '**missed**'} |",
            f"| failures | {_mmm([float(r['failed']) for r in runs], 0)} | 0 | |",
            f"| RSS per connection (KB) | {_mmm(per_conn)} | ≤ {TARGET_KB_PER_CONNECTION:g} | "
            f"{_verdict(_median(per_conn), TARGET_KB_PER_CONNECTION, False)} |",
            f"| server RSS before → after (MB) | "
            f"{_mmm([r['server']['rss_before_kb'] / 1024 for r in runs])} → "
            f"{_mmm([r['server']['rss_after_kb'] / 1024 for r in runs])} | | |",
            f"| `welcome` p50 during the ramp (ms) | {_mmm([r['welcome_ms']['p50'] for r in runs])} | | |",
            f"| `welcome` p99 during the ramp (ms) | {_mmm([r['welcome_ms']['p99'] for r in runs])} | | |",
            f"| `welcome` max (ms) | {_mmm([r['welcome_ms']['max'] for r in runs])} | | |",
            f"| upgrade p99 (ms) | {_mmm([r['connect_ms']['p99'] for r in runs])} | | |",
            f"| ramp rate (connects/s) / ramp length (s) | {runs[0]['rate']:g} / "
            f"{_mmm([r['ramp_s'] for r in runs])} | | |",
            f"| server CPU per `hello` (ms) | "
            f"{_mmm([1000 * r['server']['cpu_s_ramp'] / max(r['connected'], 1) for r in runs], 2)} | | |",
            f"| server CPU during the ramp (cores) | {_mmm([r['server']['cpu_cores_ramp'] for r in runs], 2)} | | |",
            f"| sockets lost while idle | {_mmm([float(r['lost_while_idle']) for r in runs], 0)} | 0 | |",
            "",
            f"Command: `{runs[0]['command']}`",
            "",
        ]
        per_hello = runs[-1].get("redis_per_hello", {})
        if per_hello:
            shown = {k: v for k, v in per_hello.items() if not k.startswith("_used")}
            top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(shown.items(), key=lambda kv: -kv[1])[:10])
            lines += [f"Redis commands per `hello` (last run, commandstats): {top}.", ""]

    if "throughput" in scen:
        runs = scen["throughput"]["runs"]
        lines += [
            "## 2. Turn throughput of one replica",
            "",
            f"_Measured {updated.get('throughput', '?')}, {len(runs)} runs._ Offline provider with zero delay "
            f"and {REPLY_WORDS}-word answers (`SMARTEDU_OFFLINE_REPLY_WORDS={REPLY_WORDS}`; with zero delay the "
            "batcher coalesces them into one `token` frame, so a turn is `ack` + 1 `token` + `done`). "
            "Open loop; each step is a fresh `smartedu loadtest` of "
            f"{runs[0]['steps'][0]['detail']['command'].split('--students ')[1].split()[0]} students, started at "
            f"{THROUGHPUT_RAMP_RATE:g}/s (so their `hello`s are over before the step is measured), then 20 s at "
            "the step's rate; figures are of that steady phase. A step passes when p99 `ack` "
            f"< {TARGET_ACK_P99_MS:g} ms, every question asked in the steady phase is answered, at least 90 % "
            "of the nominal rate was achieved, and there are no errors, lost or duplicated tokens. The ladder "
            "stops at the first failing step. Persistence, history, "
            "rate limits and the resumable log are on.",
            "",
        ]
        lines += _ladder_table(runs)
        lines += _disk_then(scen["throughput"])
        lines += _work_per_turn(runs, scen.get("capacity"))

    if "throughput_tmpfs" in scen:
        runs = scen["throughput_tmpfs"]["runs"]
        lines += [
            "## 2b. Turn throughput with PostgreSQL's data directory in memory",
            "",
            f"_Measured {updated.get('throughput_tmpfs', '?')}, {len(runs)} runs._ The ladder of section 2, "
            "step for step, against a second PostgreSQL of the same version and default settings (`fsync` "
            "on) whose data directory is on tmpfs (`/dev/shm`), started for the run and deleted afterwards. "
            "Every question and answer is still committed before it is acknowledged; only the WAL flush "
            "no longer waits for this machine's disk, whose `fdatasync` tail (see Machine) sets section 2's "
            "p99 `ack`. This separates what the replica and its round trips do from what the disk does; it "
            "is not a configuration to deploy.",
            "",
        ]
        lines += _ladder_table(runs)

    if "class" in scen:
        runs = scen["class"]["runs"]
        lines += [
            "## 3. A realistic class",
            "",
            f"_Measured {updated.get('class', '?')}, {len(runs)} runs._ Closed loop: students ask, read the "
            f"answer, think (exponential, mean 10 s), ask again. Offline provider at {CLASS_TTFT_MS:g} ms to first "
            f"token and {CLASS_TOKENS_PER_S:g} tokens/s, {REPLY_WORDS}-word answers, one chunk per word (the "
            "replica sends the first at once and then coalesces them into at most one `token` frame per 100 ms). "
            "Latencies and CPU are of the steady phase (after the ramp-up); RSS is the peak over the load. "
            "Server-added latency: p99 `ack`, and p99 first token minus the provider's 300 ms.",
            "",
        ]
        lines += _class_table(runs, machine.get("nproc"))
        lines += _disk_then(scen["class"])

    if "class_tmpfs" in scen:
        runs = scen["class_tmpfs"]["runs"]
        lines += [
            "## 3b. A realistic class with PostgreSQL's data directory in memory",
            "",
            f"_Measured {updated.get('class_tmpfs', '?')}, {len(runs)} runs._ Section 3's class against a "
            "PostgreSQL with its data directory on tmpfs, as in section 2b: every question is still committed "
            "before its `ack` and every answer before its `done`, without waiting for this machine's disk.",
            "",
        ]
        lines += _class_table(runs, machine.get("nproc"))

    if "fanout" in scen:
        runs = scen["fanout"]["runs"]
        p99 = [r["lag_ms"]["p99"] for r in runs]
        lines += [
            "## 4. Teacher fan-out",
            "",
            f"_Measured {updated.get('fanout', '?')}, {len(runs)} runs._ One teacher `watch`es the course while "
            f"{runs[0]['students']} students ask (think time exponential, mean {runs[0]['think_time_s']:g} s; "
            f"{CLASS_TTFT_MS:g} ms / {CLASS_TOKENS_PER_S:g} tokens/s). Students and teacher are separate "
            "processes; each token is stamped on arrival at the student and at the teacher (one monotonic clock) "
            "and matched by (conversation_id, seq). A negative lag means the teacher's process read its copy "
            "before the students' process read the original.",
            "",
            "| metric | min / median / max | target | verdict |",
            "|---|---|---|---|",
            f"| p99 lag student → teacher (ms) | {_mmm(p99)} | < {TARGET_FANOUT_P99_MS:g} | "
            f"{_verdict(_median(p99), TARGET_FANOUT_P99_MS, False)} |",
            f"| p50 lag (ms) | {_mmm([r['lag_ms']['p50'] for r in runs])} | | |",
            f"| max lag (ms) | {_mmm([r['lag_ms']['max'] for r in runs])} | | |",
            f"| tokens at the teacher per second | {_mmm([r['teacher_token_rate_per_s'] for r in runs], 0)} | | |",
            f"| tokens missing at the teacher | {_mmm([float(r['missing_at_teacher']) for r in runs], 0)} | 0 | |",
            f"| tokens duplicated at the teacher | {_mmm([float(r['teacher_duplicates']) for r in runs], 0)} | 0 | |",
            f"| replica CPU (cores) | {_mmm([r['server']['cpu_cores'] for r in runs], 2)} | | |",
            "",
            f"Command: `{runs[0]['command']}`",
            "",
        ]

    if "floor" in scen:
        runs = scen["floor"]["runs"]
        floor_best = [float(r["throughput"]["max_turns_per_s"]) for r in runs if "throughput" in r]
        lines += [
            "## 5. The floor: the same loads against `benchmarks/floor_server.py`",
            "",
            f"_Measured {updated.get('floor', '?')}, {len(runs)} runs._ The floor is aiohttp + uvloop speaking the "
            "protocol with no database, Redis or AI. For the throughput ladder it sends 1 `token` frame per "
            "answer (`--tokens 1`), like the full server does with zero delay; for the class it sends the "
            f"{REPLY_WORDS} frames at once (`--tokens {REPLY_WORDS}`), with no pacing, so its first token comes "
            "at once.",
            "",
            "| metric | full server (median) | floor (min / median / max) | ours / floor |",
            "|---|---|---|---|",
        ]
        floor_med = _median(floor_best)
        floor_ladders = [r["throughput"] for r in runs if "throughput" in r]
        capped = ""
        if floor_ladders and all(map(_never_failed, floor_ladders)):
            capped = " (every step passed: the floor's limit is higher)"
        for label, ladder in (("highest passing rate (turns/s)", "throughput"),
                              ("highest passing rate, PostgreSQL data in memory (section 2b)", "throughput_tmpfs")):
            ours_best = _median([float(r["max_turns_per_s"]) for r in scen.get(ladder, {}).get("runs", [])])
            if ours_best is None and ladder != "throughput":
                continue
            ratio = ours_best / floor_med if ours_best is not None and floor_med else None
            lines.append(
                f"| {label} | {_fmt(ours_best, 0)} | {_mmm(floor_best, 0)}{capped} | "
                f"{'≤ ' if capped else ''}{_fmt(ratio, 2)} (target ≥ 0.5: {_verdict(ratio, 0.5, True)}) |"
            )
        floor_class = [r["class"] for r in runs if "class" in r]
        ours_class = scen.get("class", {}).get("runs", [])
        for label, key, digits in (
            ("class: p99 `ack` (ms)", "ack_p99_ms", 1),
            ("class: p99 first token (ms; ours minus 300 ms)", "ttft_p99_ms", 1),
            ("class: CPU (cores)", "cpu_cores", 2),
            ("class: RSS peak (MB)", "rss_max_mb", 1),
        ):
            if key == "ttft_p99_ms":
                ours = _median([r["added_ttft_p99_ms"] for r in ours_class])
            else:
                ours = _median([r[key] for r in ours_class])
            theirs = [r[key] for r in floor_class]
            mid = _median(theirs)
            lines.append(
                f"| {label} | {_fmt(ours, digits)} | {_mmm(theirs, digits)} | "
                f"{_fmt(ours / mid if ours is not None and mid else None, 2)} |"
            )
        lines.append("")
        if runs and "throughput" in runs[0]:
            lines += ["Floor ladder steps:", "", "| run | offered/s | achieved/s | p99 ack ms | floor cores | "
                      "send_lag p99 ms | result |", "|---|---|---|---|---|---|---|"]
            for index, run in enumerate(runs, 1):
                for step in run.get("throughput", {}).get("steps", []):
                    lines.append(
                        f"| {index} | {step['rate']:g} | {_fmt(step['achieved_turns_per_s'])} | "
                        f"{_fmt(step['ack_p99_ms'])} | {_fmt(step['server']['cpu_cores'], 2)} | "
                        f"{_fmt(step['send_lag_p99_ms'])} | {'pass' if step['passed'] else 'fail'} |"
                    )
            lines.append("")

    if "durable_floor" in scen:
        lines += _durable_floor_section(scen, updated)

    if "nginx" in scen:
        runs = scen["nginx"]["runs"]
        lines += [
            "## 6. Through NGINX with two replicas",
            "",
            f"_Measured {updated.get('nginx', '?')}, {len(runs)} runs._ Configuration rendered by "
            "`deploy/nginx/render.py` with `--ws-conn-per-ip 60000 --ws-rate 60000 --ws-burst 60000`. "
            "Correctness under load, not a scaling claim: both replicas, PostgreSQL, Redis, NGINX and the "
            "generator share two cores. (a) uses the configuration as rendered (`ip_hash`: every benchmark "
            "socket comes from 127.0.0.1, so one replica takes them all); (b) removes `ip_hash` (round robin) "
            "and drops 10 % of answers after their first token, so resumes often land on the other replica; "
            "(c) students on replica 1, their teacher on replica 2.",
            "",
            "| check | min / median / max | required |",
            "|---|---|---|",
        ]
        a = [r["throughput"] for r in runs]
        b = [r["class"] for r in runs]
        c = [r["cross_replica_fanout"] for r in runs]
        lines += [
            f"| (a) {a[0]['rate']:g} turns/s: achieved turns/s | {_mmm([x['turns_per_s'] for x in a])} | |",
            f"| (a) p99 `ack` (ms) | {_mmm([x['ack_p99_ms'] for x in a])} | |",
            f"| (a) p99 `done` (ms) | {_mmm([x['done_p99_ms'] for x in a])} | |",
            f"| (a) lost + duplicated tokens | {_mmm([float(x['lost'] + x['duplicated']) for x in a], 0)} | 0 |",
            f"| (a) error rate | {_mmm([x['error_rate'] for x in a], 4)} | 0 |",
            f"| (a) upgrades per replica (last run) | {_spread_text(a[-1]['upgrades_by_replica'])} | |",
            f"| (b) {b[0]['students']} students: answers/s | {_mmm([x['turns_per_s'] for x in b])} | |",
            f"| (b) drops | {_mmm([float(x['drops']) for x in b], 0)} | |",
            f"| (b) resumed | {_mmm([float(x['resumes_ok']) for x in b], 0)} | all |",
            f"| (b) resume misses | {_mmm([float(x['resume_misses']) for x in b], 0)} | 0 |",
            f"| (b) lost + duplicated tokens | {_mmm([float(x['lost'] + x['duplicated']) for x in b], 0)} | 0 |",
            f"| (b) error rate | {_mmm([x['error_rate'] for x in b], 4)} | 0 |",
            f"| (b) p99 `ack` (ms) | {_mmm([x['ack_p99_ms'] for x in b])} | |",
            f"| (b) p99 first token (ms) | {_mmm([x['ttft_p99_ms'] for x in b])} | |",
            f"| (b) upgrades per replica (last run) | {_spread_text(b[-1]['upgrades_by_replica'])} | |",
            f"| (c) p99 lag student (replica 1) → teacher (replica 2) (ms) | "
            f"{_mmm([x['lag_ms']['p99'] for x in c])} | < {TARGET_FANOUT_P99_MS:g} |",
            f"| (c) tokens missing at the teacher | {_mmm([float(x['missing_at_teacher']) for x in c], 0)} | 0 |",
            f"| (c) tokens duplicated at the teacher | {_mmm([float(x['teacher_duplicates']) for x in c], 0)} | 0 |",
            f"| all gates passed (`--max-lost 0 --max-duplicated 0 --max-error-rate 0`) | "
            f"{sum(1 for x in a + b if x['passed'])} of {len(a) + len(b)} loads | all |",
            "",
            f"Commands: `{a[0]['command']}`; `{b[0]['command']}`",
            "",
        ]

    if "profile" in scen:
        prof = scen["profile"]["runs"][-1]
        lines += ["## Profiles (py-spy)", "",
                  f"_Measured {updated.get('profile', '?')}._ `py-spy record --rate 200 --nonblocking --format raw` "
                  "on the replica, in separate runs from the measured ones. Shares are of all samples py-spy took "
                  "(it skips most idle time, but not waiting inside uvloop's C loop, which shows as \"event loop\"). "
                  "\"Area\" charges each sample to the innermost frame that belongs to a known library or to our "
                  "code.", ""]
        for key, title in (("throughput", "Turn throughput"), ("class", "Realistic class")):
            entry = prof.get(key)
            if not entry or not entry.get("summary", {}).get("samples"):
                continue
            s = entry["summary"]
            rate = f" at {entry['rate']:g} turns/s" if "rate" in entry else ""
            lines += [f"### {title}{rate}", "",
                      f"{s['samples']:,} samples in {entry['seconds']} s at {entry['samples_per_s']} per second.", "",
                      "| area | share |", "|---|---|"]
            lines += [f"| {name} | {share:.1f} % |" for name, share in s["areas"][:10]]
            lines += ["", "| function (self time) | share |", "|---|---|"]
            lines += [f"| `{name}` | {share:.1f} % |" for name, share in s["self"][:12]]
            lines += [""]

    lines += ["## Notes and optimisations", "", NOTES_BEGIN, notes.strip("\n"), NOTES_END, ""]
    return "\n".join(lines)


def _class_table(runs: Sequence[dict[str, Any]], nproc: object) -> list[str]:
    """A class's targets and the rest of what was measured, min / median / max over the runs."""
    added = [r["added_ttft_p99_ms"] for r in runs]
    acks = [r["ack_p99_ms"] for r in runs]
    cpu = [r["cpu_cores"] for r in runs]
    rss = [r["rss_max_mb"] for r in runs]
    return [
        "| metric | min / median / max | target | verdict |",
        "|---|---|---|---|",
        f"| p99 server-added first-token latency (ms) | {_mmm(added)} | < {TARGET_CLASS_ADDED_P99_MS:g} | "
        f"{_verdict(_median(added), TARGET_CLASS_ADDED_P99_MS, False)} |",
        f"| p99 `ack` (ms) | {_mmm(acks)} | < {TARGET_CLASS_ADDED_P99_MS:g} | "
        f"{_verdict(_median(acks), TARGET_CLASS_ADDED_P99_MS, False)} |",
        f"| replica CPU (cores) | {_mmm(cpu, 2)} | < {TARGET_CLASS_CPU:g} | "
        f"{_verdict(_median(cpu), TARGET_CLASS_CPU, False)} |",
        f"| replica RSS, peak (MB) | {_mmm(rss)} | < {TARGET_CLASS_RSS_MB:g} | "
        f"{_verdict(_median(rss), TARGET_CLASS_RSS_MB, False)} |",
        f"| p50 `ack` (ms) | {_mmm([r['ack_p50_ms'] for r in runs])} | | |",
        f"| p50 first token (ms) | {_mmm([r['ttft_p50_ms'] for r in runs])} | | |",
        f"| p99 `done` (ms) | {_mmm([r['done_p99_ms'] for r in runs])} | | |",
        f"| p99 `welcome` over the whole run (ms) | {_mmm([r['welcome_p99_ms'] for r in runs])} | | |",
        f"| answers/s, frames/s | {_mmm([r['turns_per_s'] for r in runs])}, "
        f"{_mmm([r['frames_per_s'] for r in runs], 0)} | | |",
        f"| replica CPU including the ramp-up (cores) | {_mmm([r['cpu_cores_with_ramp'] for r in runs], 2)} | | |",
        f"| PostgreSQL backends CPU (cores) | "
        f"{_mmm([r['others'].get('postgres', {}).get('cpu_cores') for r in runs], 2)} | | |",
        f"| Redis CPU (cores) | {_mmm([r['others'].get('redis', {}).get('cpu_cores') for r in runs], 2)} | | |",
        f"| load generator CPU (cores) | "
        f"{_mmm([r['others'].get('loadgen', {}).get('cpu_cores') for r in runs], 2)} | | |",
        f"| whole machine busy (cores of {nproc}) | "
        f"{_mmm([r['others'].get('machine', {}).get('cpu_cores') for r in runs], 2)} | | |",
        f"| of which unrelated jobs (cores) | {_mmm([_unrelated(r) for r in runs], 2)} | | |",
        f"| Redis memory per answer (KB; the conversation logs, kept an hour) | "
        f"{_mmm([_per_turn(r, 'redis_delta', '_used_memory_bytes') for r in runs], 1)} | | |",
        f"| database growth per answer (KB, hellos included) | "
        f"{_mmm([_per_turn(r, 'pg_delta', 'database_bytes') for r in runs], 1)} | | |",
        f"| error rate | {_mmm([r['error_rate'] for r in runs], 4)} | 0 | |",
        f"| lost / duplicated tokens | {_mmm([float(r['lost']) for r in runs], 0)} / "
        f"{_mmm([float(r['duplicated']) for r in runs], 0)} | 0 | |",
        "",
        f"Command: `{runs[0]['command']}`",
        "",
    ]


def _disk_then(entry: dict[str, Any]) -> list[str]:
    """The disk probe taken just before this scenario's runs (the disk's tail varies from hour to hour)."""
    probe = entry.get("fsync")
    if not probe:
        return []
    return [f"The disk just before these runs (`fdatasync`, {probe['seconds']:g} s idle): {_tail(probe)}.", ""]


def _tail(probe: dict[str, Any]) -> str:
    return (f"p99 {_fmt(probe['p99_ms'], 2)} ms, p99.9 {_fmt(probe['p999_ms'], 1)} ms, "
            f"max {_fmt(probe['max_ms'], 1)} ms ({probe['over_20_ms']} over 20 ms)")


def _fsync_lines(probe: dict[str, Any] | None) -> list[str]:
    """The disk under PostgreSQL: every commit waits for one WAL flush like these."""
    if not probe:
        return []
    where = "PostgreSQL's data directory" if probe.get("same_filesystem") else f"`{probe.get('directory')}`"
    return [
        f"- the disk: `fdatasync` after an 8 KB write on the filesystem of {where}, "
        f"{probe['syncs']:,} times in {probe['seconds']:g} s with nothing else running: p50 "
        f"{_fmt(probe['p50_ms'], 2)} ms, {_tail(probe)}, at the last `run_all.py` "
        "invocation; sections 2 and 3 show the probe taken before their own runs. A commit waits for one such "
        "flush, so a stall here holds up every `ack` behind it.",
    ]


def _durable_floor_section(scen: dict[str, Any], updated: dict[str, str]) -> list[str]:
    runs = scen["durable_floor"]["runs"]
    best = [float(r["max_turns_per_s"]) for r in runs]
    capped = " (every step passed in some run: the limit is higher)" if any(map(_never_failed, runs)) else ""
    floor = _median([float(r["throughput"]["max_turns_per_s"]) for r in scen.get("floor", {}).get("runs", [])
                     if "throughput" in r])
    ours = _median([float(r["max_turns_per_s"]) for r in scen.get("throughput_tmpfs", {}).get("runs", [])])
    mid = _median(best)
    return [
        "## 5b. The durable floor: the least durable work a turn needs",
        "",
        f"_Measured {updated.get('durable_floor', '?')}, {len(runs)} runs._ `benchmarks/durable_floor_server.py` "
        "is the floor plus what no server keeping this product's promises can leave out, done as cheaply as it "
        "can be: the question committed to PostgreSQL before its `ack` and the answer before its `done` (group "
        "commit, one statement a batch), the answer's frames appended to a Redis stream before they are sent "
        "and each question counted in Redis (one pipeline a batch). No history reads, budgets, fan-out, "
        "metrics, logs or validation. Its PostgreSQL has its data directory in memory, like section 2b's.",
        "",
        "| metric | min / median / max |",
        "|---|---|",
        f"| highest passing rate (turns/s) | {_mmm(best, 0)}{capped} |",
        f"| durable floor / floor (median) | {_fmt(mid / floor if mid and floor else None, 2)} |",
        f"| ours in memory (section 2b) / durable floor (medians) | {_fmt(ours / mid if ours and mid else None, 2)} |",
        "",
        *_ladder_steps(runs),
    ]


def _never_failed(ladder: dict[str, Any]) -> bool:
    """Whether a ladder passed its last step: it stops at its first failure, so then it never failed and its
    highest passing rate is a lower bound of the limit, not the limit."""
    return bool(ladder["steps"]) and bool(ladder["steps"][-1]["passed"])


def _ladder_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    """A throughput ladder's verdict, every step of every run, how to read them, and the command."""
    best = [float(r["max_turns_per_s"]) for r in runs]
    capped = " (every step passed in some run: the limit is higher)" if any(map(_never_failed, runs)) else ""
    lines = [
        "| metric | min / median / max | target | verdict |",
        "|---|---|---|---|",
        f"| highest passing rate (turns/s) | {_mmm(best, 0)}{capped} | ≥ {TARGET_TURNS_PER_S:g} | "
        f"{_verdict(_median(best), TARGET_TURNS_PER_S, True)} |",
        "",
        *_ladder_steps(runs),
    ]
    return lines


def _ladder_steps(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Every step of every run of a throughput ladder, how to read them, and the command."""
    lines = [
        "Every step of every run:",
        "",
        "| run | offered/s | achieved/s | p50 ack ms | p99 ack ms | worst second p99 ack ms | p99 done ms | "
        "server cores | PG cores | Redis cores | loadgen cores | machine busy cores | unrelated jobs cores | "
        "send_lag p99 ms | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(runs, 1):
        for step in run["steps"]:
            cores = _cores(step["detail"].get("sampled") or {})
            result = "pass" if step["passed"] else ("fail (noisy, run again)" if step.get("noisy")
                                                    and step is not run["steps"][-1] else "fail")
            lines.append(
                f"| {index} | {step['rate']:g} | {_fmt(step['achieved_turns_per_s'])} | {_fmt(step['ack_p50_ms'])}"
                f" | {_fmt(step['ack_p99_ms'])} | {_fmt(step.get('worst_second_ack_p99_ms'))} | "
                f"{_fmt(step['done_p99_ms'])} | "
                f"{_fmt(step['server']['cpu_cores'], 2)} | {cores['postgres']} | {cores['redis']} | "
                f"{cores['loadgen']} | {cores['machine']} | {cores['unrelated']} | "
                f"{_fmt(step['send_lag_p99_ms'])} | {result} |"
            )
    lines += ["", "\"Worst second\" is the highest of the per-second p99s of `ack` (the load tester's time "
              "series): a step that fails on one short stall shows it there. A step that fails while the load "
              f"generator lagged (send_lag p99 > {NOISY_SEND_LAG_MS:g} ms) or unrelated jobs took more than "
              f"{NOISY_UNRELATED_CORES:g} cores is run once more.", ""]
    lines += [f"Command (one step): `{runs[0]['command']}`", ""]
    return lines


def _cores(sampled: dict[str, Any]) -> dict[str, str]:
    """Steady-phase CPU of everything sampled next to the server, formatted; `unrelated` is what the rest of
    the machine (other people's jobs) used meanwhile."""
    values = {name: ((sampled.get(name) or {}).get("steady") or {}).get("cpu_cores") for name in sampled}
    out = {name: _fmt(values.get(name), 2) for name in ("postgres", "redis", "loadgen", "machine")}
    machine = values.get("machine")
    ours = [v for k, v in values.items() if k != "machine" and v is not None]
    out["unrelated"] = _fmt(max(0.0, machine - sum(ours)), 2) if machine is not None else "-"
    return out


def _per_turn(run: dict[str, Any], where: str, key: str) -> float | None:
    value = run.get(where, {}).get(key)
    turns = run.get("turns")
    if value is None or not turns or value < 0:
        return None
    per_turn: float = float(value) / float(turns) / 1024
    return per_turn


def _spread_text(upgrades: dict[str, int]) -> str:
    return ", ".join(f"replica {i}: {n}" for i, (_, n) in enumerate(sorted(upgrades.items()), 1)) or "-"


def _unrelated(run: dict[str, Any]) -> float | None:
    machine: float | None = run["others"].get("machine", {}).get("cpu_cores")
    if machine is None:
        return None
    ours = [run.get("cpu_cores")] + [v.get("cpu_cores") for k, v in run["others"].items() if k != "machine"]
    rest: float = machine - sum(float(x) for x in ours if x is not None)
    return max(0.0, rest)


def _work_per_turn(runs: Sequence[dict[str, Any]], capacity: dict[str, Any] | None) -> list[str]:
    """Redis commands and PostgreSQL work per turn, with the per-hello share (scenario 1) taken out."""
    run = runs[-1]
    turns, hellos = run.get("turns", 0), run.get("hellos", 0)
    if not turns:
        return []
    redis_hello: dict[str, float] = {}
    pg_hello: dict[str, float] = {}
    if capacity and capacity.get("runs"):
        redis_hello = capacity["runs"][-1].get("redis_per_hello", {})
        pg_hello = capacity["runs"][-1].get("pg_per_hello", {})
    # Presence heartbeats (ZADD) scale with time connected, not with hellos: not subtracted.
    redis_hello = {k: v for k, v in redis_hello.items() if k != "zadd"}
    redis = run.get("redis_delta", {})
    rows = []
    for name, count in sorted(redis.items(), key=lambda kv: -kv[1]):
        if name.startswith("_used_memory"):
            continue
        net = (count - redis_hello.get(name, 0.0) * hellos) / turns
        if net >= 0.05:
            rows.append(f"| {'all commands' if name == '_total' else name} | {net:.2f} |")
    pg = run.get("pg_delta", {})
    lines = [
        f"Work per turn, last run ({turns:,} turns, {hellos:,} `hello`s taken out at the per-`hello` cost measured "
        "in scenario 1). Redis: server-wide `INFO commandstats` deltas, commands run inside Lua scripts "
        "included. PostgreSQL: `pg_stat_database` of the run's own database (`xact_commit` counts every "
        "statement outside a transaction, every transaction and every pool reset).",
        "",
        "| Redis command | calls per turn |",
        "|---|---|",
        *rows,
        "",
        "| PostgreSQL | per turn |",
        "|---|---|",
    ]
    for key in ("xact_commit", "tup_inserted", "tup_updated", "tup_fetched", "tup_returned", "wal_bytes_cluster"):
        if key in pg:
            net = (pg[key] - pg_hello.get(key, 0.0) * hellos) / turns
            lines.append(f"| {key} | {net:,.2f} |")
    if "database_bytes" in pg:
        lines.append(f"| database growth (bytes, hellos included) | {pg['database_bytes'] / turns:,.0f} |")

    lines.append("")
    return lines


# -- main -----------------------------------------------------------------------------------------------


def _load_summary() -> dict[str, Any]:
    path = RESULTS / "summary.json"
    if path.exists():
        data: dict[str, Any] = orjson.loads(path.read_bytes())
        return data
    return {"scenarios": {}, "updated": {}}


def _existing_notes() -> str:
    if not DOC.exists():
        return "(none yet)"
    text = DOC.read_text()
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return "(none yet)"


def _probe_disk(admin_dsn: str, out: Path, seconds: float) -> dict[str, Any]:
    """fdatasync latency on the filesystem of PostgreSQL's data directory (the results directory when that is
    the same filesystem, else the data directory's parent), measured while nothing else runs."""
    print(f"fsync probe ({seconds:g} s)", flush=True)
    data = postgres_data_directory(admin_dsn)
    device = os.stat(data).st_dev if data is not None and data.exists() else None
    where = data.parent if data is not None and device is not None and device != os.stat(out).st_dev else out
    probe = fsync_probe(where, seconds)
    probe["postgres_data_directory"] = str(data) if data else None
    probe["same_filesystem"] = device is not None and device == os.stat(where).st_dev
    return probe


def _runs(bench: Bench, name: str, fn: Callable[[Bench, int], dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for run in range(1, bench.plan.runs + 1):
        started = time.monotonic()
        print(f"  {name} run {run}/{bench.plan.runs}", flush=True)
        result = fn(bench, run)
        result["wall_s"] = time.monotonic() - started
        bench.save(f"{name}-run{run}.json", result)
        results.append(result)
    return results


_TABLE: dict[str, Callable[[Bench, int], dict[str, Any]]] = {
    "capacity": scenario_capacity, "throughput": scenario_throughput,
    "throughput_tmpfs": scenario_throughput_tmpfs, "class": scenario_class, "class_tmpfs": scenario_class_tmpfs,
    "fanout": scenario_fanout, "nginx": scenario_nginx, "durable_floor": scenario_durable_floor,
}


def profile_rate(summary: dict[str, Any], asked: float | None = None) -> float:
    """The throughput step to profile: `asked` (--profile-rate), else the highest median rate a throughput
    ladder passed (what dominates when the replica is busiest), this invocation's ladders or the last
    `make bench`'s. The in-memory ladder counts too, since the disk's stalls can fail the other at any rate."""
    if asked is not None:
        return asked
    medians = [
        _median([float(r["max_turns_per_s"]) for r in summary.get("scenarios", {}).get(ladder, {}).get("runs", [])])
        for ladder in ("throughput", "throughput_tmpfs")
    ]
    return max((m for m in medians if m), default=None) or TARGET_TURNS_PER_S


def _scenario(
    bench: Bench, name: str, summary: dict[str, Any], rate: float | None = None
) -> list[dict[str, Any]]:
    if name == "floor":
        return _runs(bench, "floor", lambda b, r: {
            "throughput": scenario_floor_throughput(b, r), "class": scenario_floor_class(b, r)})
    if name == "profile":
        result = scenario_profile(bench, profile_rate(summary, rate))
        bench.save("profile.json", result)
        return [result]
    return _runs(bench, name, _TABLE[name])


def _rates(parser: argparse.ArgumentParser, given: str, option: str) -> tuple[float, ...]:
    try:
        ladder = tuple(float(r) for r in given.split(",") if r.strip())
    except ValueError:
        parser.error(f"{option} takes numbers, e.g. 250,300")
    if not ladder or min(ladder) <= 0:
        parser.error(f"{option} takes positive numbers, e.g. 250,300")
    return ladder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the SmartEdu benchmarks and write docs/benchmarks.md.")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--runs", type=int, help="runs per scenario (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller loads, shorter steps (under 5 minutes)")
    parser.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md and results/summary.json "
                        "alone (experiments); the raw results are still written")
    parser.add_argument("--ref", help="benchmark this git commit (exported to a temporary directory) instead of "
                        "the working tree")
    parser.add_argument("--code-dir", type=Path, help="benchmark a copy of the project in this directory (A/B "
                        "experiments with uncommitted changes)")
    parser.add_argument("--rates", help="comma-separated turns/s for the throughput ladder (default "
                        f"{','.join(f'{r:g}' for r in Plan.ladder)}; experiments)")
    parser.add_argument("--floor-rates", help="comma-separated turns/s for the floor's and the durable floor's "
                        "throughput ladders (experiments)")
    parser.add_argument("--profile-rate", type=float, metavar="PER_S", help="turns/s of the profiled throughput "
                        "step (default: the highest median rate a throughput ladder passed, in this invocation "
                        "or the last make bench)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.quick and args.scenarios == parser.get_default("scenarios"):
        chosen.remove("profile")  # profiles are read, not compared: --scenarios profile asks for one
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if not 1 <= runs <= 20:
        parser.error("--runs must be 1..20")
    if args.ref and args.code_dir:
        parser.error("give --ref or --code-dir, not both")
    plan = Plan.quick(runs) if args.quick else Plan(runs=runs)
    if args.rates:
        plan = dataclasses.replace(plan, ladder=_rates(parser, args.rates, "--rates"))
    if args.floor_rates:
        ladder = _rates(parser, args.floor_rates, "--floor-rates")
        plan = dataclasses.replace(plan, floor_ladder=ladder, durable_ladder=ladder)
    if args.profile_rate is not None and args.profile_rate <= 0:
        parser.error("--profile-rate takes a positive number of turns/s")

    # SIGTERM ends the run like Ctrl-C: every finally block stops what it started.
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    summary = _load_summary()
    print(f"benchmarks -> {out}", flush=True)
    failures: dict[str, str] = {}
    started = time.monotonic()
    backends: Backends | None = None
    try:
        with export_code(args.ref, args.code_dir):
            summary["machine"] = machine_info()
            backends = Backends.start()
            summary["backends"] = {**backends.versions(), "postgres_kind": backends.postgres_kind,
                                   "redis_kind": backends.redis_kind}
            summary["machine"]["fsync"] = _probe_disk(backends.admin_dsn, out, plan.fsync_probe_s)
            bench = Bench(plan, backends, out)
            for name in SCENARIOS:
                if name not in chosen:
                    continue
                print(f"{name} ({time.monotonic() - started:.0f} s elapsed; {code_label()})", flush=True)
                try:
                    results = _scenario(bench, name, summary, args.profile_rate)
                except (BenchError, OSError, TimeoutError, RuntimeError, ValueError) as exc:
                    failures[name] = repr(exc)
                    print(f"  {name} failed: {exc!r}", flush=True)
                    continue
                summary["scenarios"][name] = {"runs": results, "quick": args.quick, "results_dir": out.name,
                                              "code": code_label(), "fsync": summary["machine"]["fsync"]}
                summary["updated"][name] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC") + (
                    " (--quick)" if args.quick else "")
                bench.save(f"{name}-summary.json", summary["scenarios"][name] | {"updated": summary["updated"][name]})
                if not args.no_doc:
                    (RESULTS / "summary.json").write_bytes(
                        orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
                    DOC.write_text(render_doc(summary, _existing_notes()))
    except KeyboardInterrupt:
        print("interrupted: everything started has been stopped", file=sys.stderr)
        return 130
    finally:
        if backends is not None:
            backends.stop()
    failed = f"; failed: {failures}" if failures else ""
    print(f"done in {time.monotonic() - started:.0f} s; results in {out}{failed}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
