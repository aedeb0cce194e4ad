"""What a run shows: live progress, the final tables, the JSON results, the latency plot, the gate."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .stats import DRAIN, LOAD_PHASES, METRICS, PERCENTILES, PHASES, SERIES_METRICS, PhaseStats, RunStats

ALL = "all"
RESULTS_VERSION = 1

# Counters shown in the final table, in this order (all counters go to the JSON results).
_TABLE_COUNTERS = (
    "connect_attempts",
    "connect_failures",
    "turns_attempted",
    "turns_sent",
    "turns_ok",
    "turns_failed",
    "turns_refused",
    "turns_unfinished",
    "turns_abandoned",
    "timeouts",
    "disconnects",
    "drops",
    "resumes_ok",
    "resume_misses",
    "resent",
    "lost_tokens",
    "lost_chars",
    "duplicate_tokens",
    "duplicate_chars",
    "text_checks",
    "text_mismatches",
    "text_unchecked",
    "missing_offsets",
    "missing_lengths",
    "unexpected_frames",
    "late_frames",
    "conversation_switches",
    "teacher_events",
    "student_crashes",
    "task_crashes",
)
_RATES = (
    ("turns", "answers"),
    ("frames", "frames"),
    ("token_frames", "token_frames"),
    ("chars", "chars"),
    ("output_tokens", "output_tokens"),
)


# -- results -----------------------------------------------------------------------------------------


def _phase_results(
    phase: PhaseStats, window: tuple[float, float], load: tuple[PhaseStats, float] | None = None
) -> dict[str, Any]:
    """One phase's results; `load` gives the counts and seconds of the rates when they differ (all)."""
    duration = max(window[1] - window[0], 0.0)
    counters = dict(sorted(phase.counters.items()))
    source, seconds = load if load is not None else (phase, duration)
    rates = {name: (round(source.counters[counter] / seconds, 3) if seconds > 0 else None) for name, counter in _RATES}
    error_rate = phase.error_rate()
    return {
        "window_s": [round(window[0], 3), round(window[1], 3)],
        "duration_s": round(duration, 3),
        "latency_ms": {metric: phase.latency[metric].summary() for metric in METRICS},
        "counters": counters,
        "rates_per_s": rates,
        "error_rate": None if error_rate is None else round(error_rate, 6),
        "errors_by_code": dict(sorted(phase.errors.items())),
        "refused_by_code": dict(sorted(phase.refused.items())),
        "close_codes": dict(sorted(phase.close_codes.items())),
        "done_status": dict(sorted(phase.done_status.items())),
        "connect_failures": dict(sorted(phase.connect_failures.items())),
        "watch_errors": dict(sorted(phase.watch_errors.items())),
    }


def build_results(stats: RunStats, config: Mapping[str, Any], started_at: str, finished_at: str) -> dict[str, Any]:
    """The JSON-ready results of a run; thresholds are added by `apply_thresholds`."""
    phases: dict[str, Any] = {}
    for name in PHASES:
        phases[name] = _phase_results(stats.phases[name], stats.window(name))
    # Whole-run totals, but rates over the load only: the drain would dilute them.
    whole = (0.0, stats.window(DRAIN)[1])
    load = (stats.combined(LOAD_PHASES), stats.window(ALL)[1])
    phases[ALL] = _phase_results(stats.combined(), whole, load)
    return {
        "tool": "smartedu-loadtest",
        "version": RESULTS_VERSION,
        "started_at": started_at,
        "finished_at": finished_at,
        "config": dict(config),
        "phases": phases,
        "stopped_early": stats.stopped_early,
        "drain_stopped": stats.drain_stopped,
        "timeseries": {
            "interval_s": stats.series.interval,
            "columns": ["t_s", "count", "p50_ms", "p99_ms", "max_ms"],
            **{metric: [list(point) for point in stats.series.points[metric]] for metric in SERIES_METRICS},
        },
    }


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")


# -- thresholds ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """A limit on one value of the gated phase; `minimum` turns it into a floor."""

    name: str
    limit: float
    read: Callable[[Mapping[str, Any]], float | None]
    unit: str = ""
    minimum: bool = False

    def check(self, phase: Mapping[str, Any]) -> tuple[float | None, bool]:
        value = self.read(phase)
        if value is None:
            # Nothing measured (no answer at all) cannot pass a gate.
            return None, False
        return value, (value >= self.limit if self.minimum else value <= self.limit)


def _latency(metric: str, percentile: str) -> Callable[[Mapping[str, Any]], float | None]:
    def read(phase: Mapping[str, Any]) -> float | None:
        value = phase["latency_ms"][metric][percentile]
        return None if value is None else float(value)

    return read


def _counter(name: str) -> Callable[[Mapping[str, Any]], float | None]:
    def read(phase: Mapping[str, Any]) -> float | None:
        return float(phase["counters"].get(name, 0))

    return read


def _error_rate(phase: Mapping[str, Any]) -> float | None:
    value = phase["error_rate"]
    return None if value is None else float(value)


def _turn_rate(phase: Mapping[str, Any]) -> float | None:
    value = phase["rates_per_s"]["turns"]
    return None if value is None else float(value)


# option dest -> (threshold name, reader, unit, is a floor)
THRESHOLD_OPTIONS: dict[str, tuple[str, Callable[[Mapping[str, Any]], float | None], str, bool]] = {
    "max_error_rate": ("error rate", _error_rate, "", False),
    "max_p99_connect_ms": ("p99 connect", _latency("connect", "p99"), "ms", False),
    "max_p99_welcome_ms": ("p99 welcome", _latency("welcome", "p99"), "ms", False),
    "max_p99_ack_ms": ("p99 ack", _latency("ack", "p99"), "ms", False),
    "max_p99_ttft_ms": ("p99 ttft", _latency("ttft", "p99"), "ms", False),
    "max_p99_done_ms": ("p99 done", _latency("done", "p99"), "ms", False),
    "max_lost": ("lost tokens", _counter("lost_tokens"), "", False),
    "max_duplicated": ("duplicated tokens", _counter("duplicate_tokens"), "", False),
    "max_disconnects": ("disconnects", _counter("disconnects"), "", False),
    "max_resume_misses": ("resume misses", _counter("resume_misses"), "", False),
    "max_refused": ("refused turns", _counter("turns_refused"), "", False),
    "max_unexpected_frames": ("unexpected frames", _counter("unexpected_frames"), "", False),
    "max_text_mismatches": ("text mismatches", _counter("text_mismatches"), "", False),
    "min_turns_per_s": ("turns per second", _turn_rate, "/s", True),
}


def thresholds_from_options(options: Mapping[str, float | None]) -> list[Threshold]:
    found: list[Threshold] = []
    for dest, (name, read, unit, floor) in THRESHOLD_OPTIONS.items():
        limit = options.get(dest)
        if limit is not None:
            found.append(Threshold(name, float(limit), read, unit, floor))
    return found


def apply_thresholds(results: dict[str, Any], thresholds: list[Threshold], phase: str) -> list[dict[str, Any]]:
    """Check each threshold on `phase` of the results; records the verdicts in the results."""
    checked: list[dict[str, Any]] = []
    for threshold in thresholds:
        value, passed = threshold.check(results["phases"][phase])
        checked.append(
            {
                "name": threshold.name,
                "phase": phase,
                "limit": threshold.limit,
                "kind": "min" if threshold.minimum else "max",
                "value": value,
                "unit": threshold.unit,
                "passed": passed,
            }
        )
    results["thresholds"] = checked
    results["passed"] = all(item["passed"] for item in checked)
    return checked


def describe_check(item: Mapping[str, Any]) -> str:
    unit = f" {item['unit']}" if item["unit"] and item["unit"] != "/s" else item["unit"]
    if item["value"] is None:
        return f"{item['name']}: nothing measured (limit {item['limit']:g}{unit}, phase {item['phase']})"
    sign = {("min", True): ">=", ("min", False): "<", ("max", True): "<=", ("max", False): ">"}[
        (item["kind"], item["passed"])
    ]
    return f"{item['name']} {item['value']:g}{unit} {sign} {item['limit']:g}{unit} (phase {item['phase']})"


# -- console -------------------------------------------------------------------------------------------


def _ms(value: object) -> str:
    if value is None:
        return "-"
    assert isinstance(value, int | float)
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def render_summary(console: Console, results: Mapping[str, Any]) -> None:
    phases: Mapping[str, Any] = results["phases"]
    names = [
        name
        for name in (*PHASES, ALL)
        if name == ALL or (phases[name]["duration_s"] > 0 and (name != DRAIN or phases[name]["counters"]))
    ]

    latency = Table(title="Latency (ms)", title_justify="left")
    for column in ("phase", "metric", "count", *(f"p{p:g}" for p in PERCENTILES), "max"):
        latency.add_column(column, justify="left" if column in ("phase", "metric") else "right")
    for name in names:
        for metric in METRICS:
            summary = phases[name]["latency_ms"][metric]
            if not summary["count"]:
                continue
            latency.add_row(
                name,
                metric,
                str(summary["count"]),
                *(_ms(summary[f"p{p:g}"]) for p in PERCENTILES),
                _ms(summary["max"]),
            )
    console.print(latency)

    counters = Table(title="Counts and rates", title_justify="left")
    counters.add_column("")
    for name in names:
        counters.add_column(f"{name} ({phases[name]['duration_s']:.1f} s)", justify="right")
    for counter in _TABLE_COUNTERS:
        values = [phases[name]["counters"].get(counter, 0) for name in names]
        if any(values) or counter in ("turns_ok", "lost_tokens", "duplicate_tokens"):
            counters.add_row(counter, *(str(v) for v in values))
    for rate, _ in _RATES:
        counters.add_row(f"{rate}/s", *(_ms(phases[name]["rates_per_s"][rate]) for name in names))
    counters.add_row(
        "error rate",
        *("-" if phases[name]["error_rate"] is None else f"{phases[name]['error_rate'] * 100:.2f}%" for name in names),
    )
    console.print(counters)

    everything = phases[ALL]
    for label, key in (
        ("errors by code", "errors_by_code"),
        ("refused by code", "refused_by_code"),
        ("close codes", "close_codes"),
        ("done status", "done_status"),
        ("connect failures", "connect_failures"),
        ("watch errors", "watch_errors"),
    ):
        if everything[key]:
            parts = ", ".join(f"{code}: {count}" for code, count in everything[key].items())
            console.print(f"{label}: {parts}")

    for item in results.get("thresholds", []):
        verdict = Text("PASS", style="green") if item["passed"] else Text("FAIL", style="bold red")
        console.print(verdict, Text(describe_check(item)))


class LiveProgress:
    """A live view of the run, refreshed on each tick; a no-op when disabled."""

    def __init__(self, console: Console, duration: float, students: int, enabled: bool) -> None:
        self._console = console
        self._duration = duration
        self._students = students
        self._live: Live | None = Live(console=console, auto_refresh=False, transient=True) if enabled else None
        self._previous: tuple[float, int, int] | None = None

    def __enter__(self) -> LiveProgress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def tick(self, stats: RunStats, now: float) -> None:
        if self._live is None:
            return
        self._live.update(self._render(stats, now), refresh=True)

    def _render(self, stats: RunStats, now: float) -> Group:
        elapsed = now - stats.started
        total = stats.total
        turns, frames = total["answers"], total["frames"]
        turn_rate = frame_rate = 0.0
        if self._previous is not None and now > self._previous[0]:
            span = now - self._previous[0]
            turn_rate = (turns - self._previous[1]) / span
            frame_rate = (frames - self._previous[2]) / span
        self._previous = (now, turns, frames)
        phase = "ramp-up" if now < stats.ramp_end else ("steady" if elapsed < self._duration else "draining")
        head = Text.assemble(
            (f"{min(elapsed, self._duration):6.1f}/{self._duration:.0f} s ", "bold"),
            (f"{phase:9} ", "cyan"),
            f"students {stats.connected_students}/{stats.launched_students}/{self._students}  ",
            f"teachers {stats.connected_teachers}  ",
            f"turns {total['turns_ok']} ok, {total['turns_failed']} failed, {total['turns_refused']} refused  ",
            f"{turn_rate:,.1f} turns/s  {frame_rate:,.0f} frames/s  ",
        )
        problems = Text.assemble(
            f"errors {total['errors']}  disconnects {total['disconnects']}  ",
            f"lost {total['lost_tokens']}  duplicated {total['duplicate_tokens']}  ",
            f"resume misses {total['resume_misses']}",
            style="red" if total["errors"] or total["lost_tokens"] or total["duplicate_tokens"] else "",
        )
        table = Table(box=None, padding=(0, 2), title="last interval (ms)", title_justify="left")
        for column in ("metric", "count", "p50", "p99", "max"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for metric in SERIES_METRICS:
            point = stats.series.latest(metric)
            if point is None:
                table.add_row(metric, "0", "-", "-", "-")
            else:
                table.add_row(metric, str(point[1]), _ms(point[2]), _ms(point[3]), _ms(point[4]))
        return Group(head, problems, table)


# -- plot --------------------------------------------------------------------------------------------


def write_plot(path: Path, stats: RunStats) -> None:
    """Latency over time (p50 and p99 per interval) and latency distributions, as a PNG."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    over_time, distribution = figure.subplots(2, 1)
    # One colour per metric in both panels, none repeated (matplotlib's default cycle would reuse them).
    colours = {
        "connect": "tab:purple",
        "welcome": "tab:orange",
        "ack": "tab:green",
        "ttft": "tab:blue",
        "done": "tab:red",
    }
    plotted = False
    for metric in SERIES_METRICS:
        points = stats.series.points[metric]
        if not points:
            continue
        plotted = True
        times = [p[0] for p in points]
        over_time.plot(times, [p[2] for p in points], color=colours[metric], label=f"{metric} p50")
        over_time.plot(times, [p[3] for p in points], color=colours[metric], linestyle="--", label=f"{metric} p99")
    ramp = stats.window("ramp-up")[1]
    if ramp > 0:
        over_time.axvline(ramp, color="grey", linestyle=":", label="end of ramp-up")
    over_time.set_title(f"Latency over time (per {stats.series.interval:g} s, by completion time)")
    over_time.set_xlabel("seconds since start")
    over_time.set_ylabel("ms")
    if plotted:
        over_time.set_yscale("log")
        over_time.legend(loc="upper left", fontsize="small", ncols=2)
    else:
        over_time.text(0.5, 0.5, "no answers measured", ha="center", va="center", transform=over_time.transAxes)

    combined = stats.combined()
    ticks = [50.0, 90.0, 99.0, 99.9, 99.99]
    drawn = False
    for metric in ("connect", "welcome", *SERIES_METRICS):
        curve = [(p, v) for p, v in combined.latency[metric].percentile_curve() if p < 99.999]
        if not curve:
            continue
        drawn = True
        xs = [1.0 / (1.0 - p / 100.0) for p, _ in curve]
        distribution.plot(xs, [v for _, v in curve], label=metric, color=colours[metric])
    distribution.set_title("Latency distribution (whole run)")
    distribution.set_xscale("log")
    distribution.set_xticks([1.0 / (1.0 - t / 100.0) for t in ticks], [f"{t:g}%" for t in ticks])
    distribution.set_xlabel("percentile")
    distribution.set_ylabel("ms")
    if drawn:
        distribution.legend(loc="upper left", fontsize="small")
        distribution.set_yscale("log")
    figure.savefig(path, format="png")
