"""Measurements of a load test: HDR latency histograms and counters per phase, and a latency time series."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

RAMP_UP = "ramp-up"
STEADY = "steady"
DRAIN = "drain"  # after --duration: no new questions, answers in flight finish
PHASES = (RAMP_UP, STEADY, DRAIN)
LOAD_PHASES = (RAMP_UP, STEADY)

# connect: TCP + WebSocket upgrade; welcome: hello sent -> welcome; ack / ttft / done: question
# (intended) send -> ack / first token / done; refused: question (intended) send -> the server's refusal;
# reconnect: socket dropped -> resumed welcome; send_lag: intended -> actual send (open loop; shows a
# backlog in the client or the connection).
METRICS = ("connect", "welcome", "ack", "ttft", "done", "refused", "reconnect", "send_lag")
SERIES_METRICS = ("ack", "ttft", "done")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)

# 1 µs to 1 hour at 3 significant digits: about 190 KiB per histogram, a fixed cost per phase and metric.
_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000
_SIGNIFICANT_DIGITS = 3


def _percentile_key(p: float) -> str:
    return f"p{p:g}"


class LatencyHistogram:
    """Latencies recorded in microseconds, reported in milliseconds."""

    __slots__ = ("_hist", "_sum_us", "clamped")

    def __init__(self) -> None:
        self._hist = HdrHistogram(_LOWEST_US, _HIGHEST_US, _SIGNIFICANT_DIGITS)
        self._sum_us = 0  # exact mean for free (hdrh's own walks every bucket in Python)
        self.clamped = 0

    def record(self, seconds: float) -> None:
        micros = round(seconds * 1_000_000)
        if micros < _LOWEST_US:
            micros = _LOWEST_US
        elif micros > _HIGHEST_US:
            micros = _HIGHEST_US
            self.clamped += 1
        self._hist.record_value(micros)
        self._sum_us += micros

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def percentile_ms(self, percentile: float) -> float | None:
        if self.count == 0:
            return None
        return float(self._hist.get_value_at_percentile(percentile)) / 1000.0

    def max_ms(self) -> float | None:
        if self.count == 0:
            return None
        return float(self._hist.get_max_value()) / 1000.0

    def add(self, other: LatencyHistogram) -> None:
        if other.count:
            self._hist.add(other._hist)
        self._sum_us += other._sum_us
        self.clamped += other.clamped

    def percentile_curve(self) -> list[tuple[float, float]]:
        """(percentile, ms) points for a distribution plot, denser towards the tail."""
        if self.count == 0:
            return []
        points: list[tuple[float, float]] = []
        for item in self._hist.get_percentile_iterator(5):
            points.append((float(item.percentile_level_iterated_to), float(item.value_iterated_to) / 1000.0))
        return points

    def summary(self) -> dict[str, object]:
        count = self.count
        result: dict[str, object] = {"count": count}
        if count == 0:
            result.update({"mean": None, **{_percentile_key(p): None for p in PERCENTILES}, "max": None})
            return result
        values = self._hist.get_percentile_to_value_dict(list(PERCENTILES))
        result["mean"] = round(self._sum_us / count / 1000.0, 3)
        for p in PERCENTILES:
            result[_percentile_key(p)] = round(float(values[p]) / 1000.0, 3)
        result["max"] = round(float(self._hist.get_max_value()) / 1000.0, 3)
        if self.clamped:
            result["clamped_at_max"] = self.clamped
        # The encoded histogram lets several runs (or load generators) be merged losslessly later.
        result["hdr"] = self._hist.encode().decode("ascii")
        return result


@dataclass
class PhaseStats:
    """Everything measured in one phase; events belong to the phase in which they started."""

    name: str
    latency: dict[str, LatencyHistogram] = field(default_factory=lambda: {m: LatencyHistogram() for m in METRICS})
    counters: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # refused questions by error code
    close_codes: Counter[str] = field(default_factory=Counter)
    done_status: Counter[str] = field(default_factory=Counter)
    connect_failures: Counter[str] = field(default_factory=Counter)
    watch_errors: Counter[str] = field(default_factory=Counter)

    def add(self, other: PhaseStats) -> None:
        for metric, hist in other.latency.items():
            self.latency[metric].add(hist)
        self.counters.update(other.counters)
        self.errors.update(other.errors)
        self.refused.update(other.refused)
        self.close_codes.update(other.close_codes)
        self.done_status.update(other.done_status)
        self.connect_failures.update(other.connect_failures)
        self.watch_errors.update(other.watch_errors)

    @property
    def failures(self) -> int:
        c = self.counters
        # A refused question is no lost answer (turns_refused, not turns_failed), but its student got no answer:
        # it counts here, so that a deployment shedding its load cannot pass --max-error-rate.
        unanswered = c["turns_failed"] + c["turns_refused"] + c["turns_unfinished"]
        return unanswered + c["connect_failures"] + c["student_crashes"]

    @property
    def operations(self) -> int:
        c = self.counters
        return c["turns_attempted"] - c["turns_abandoned"] + c["connect_attempts"] + c["student_crashes"]

    def error_rate(self) -> float | None:
        """Failed, refused and unfinished turns, failed connects and crashed students over questions asked,
        connects tried and crashed students."""
        operations = self.operations
        if operations <= 0:
            return None
        return self.failures / operations


@dataclass
class _OpenBucket:
    index: int = -1
    values: array[float] = field(default_factory=lambda: array("d"))


class LatencySeries:
    """Per-interval latency summaries by completion time; keeps raw values of the current interval only."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._open: dict[str, _OpenBucket] = {m: _OpenBucket() for m in SERIES_METRICS}
        self.points: dict[str, list[tuple[float, int, float, float, float]]] = {m: [] for m in SERIES_METRICS}

    def record(self, metric: str, elapsed: float, seconds: float) -> None:
        bucket = self._open[metric]
        index = int(elapsed // self.interval)
        if index != bucket.index:
            self._close(metric, bucket)
            bucket.index = index
        bucket.values.append(seconds * 1000.0)

    def flush(self) -> None:
        for metric, bucket in self._open.items():
            self._close(metric, bucket)

    def _close(self, metric: str, bucket: _OpenBucket) -> None:
        if bucket.values:
            ordered = sorted(bucket.values)
            n = len(ordered)
            self.points[metric].append(
                (
                    round((bucket.index + 0.5) * self.interval, 3),
                    n,
                    round(_nearest_rank(ordered, 50.0), 3),
                    round(_nearest_rank(ordered, 99.0), 3),
                    round(ordered[-1], 3),
                )
            )
            bucket.values = array("d")
        bucket.index = -1

    def latest(self, metric: str) -> tuple[float, int, float, float, float] | None:
        points = self.points[metric]
        return points[-1] if points else None


def _nearest_rank(ordered: list[float], percentile: float) -> float:
    # The rank HdrHistogram uses (rounded half up), so that the series agrees with the summary's percentiles.
    rank = min(max(1, int(percentile * len(ordered) / 100.0 + 0.5)), len(ordered))
    return ordered[rank - 1]


class RunStats:
    """Stats of one run: a PhaseStats per phase, chosen by the time (monotonic) an event started."""

    def __init__(self, started: float, ramp_end: float, end_at: float, interval: float = 1.0) -> None:
        self.started = started
        self.ramp_end = ramp_end
        self.end_at = end_at  # end of the load (moved earlier when the run is stopped)
        self.finished: float | None = None
        self.stopped_early = False  # stopped (Ctrl-C, SIGTERM) before the end of the load
        self.drain_stopped = False  # stopped during the drain: answers still in flight were not waited for
        self.phases = {name: PhaseStats(name) for name in PHASES}
        self.series = LatencySeries(interval)
        # Gauges and running totals for the live display.
        self.connected_students = 0
        self.connected_teachers = 0
        self.launched_students = 0
        self.total = Counter[str]()

    def phase(self, at: float) -> PhaseStats:
        if at >= self.end_at:
            return self.phases[DRAIN]
        return self.phases[RAMP_UP if at < self.ramp_end else STEADY]

    def record(self, metric: str, started: float, seconds: float, now: float) -> None:
        self.phase(started).latency[metric].record(seconds)
        if metric in self.series.points:
            self.series.record(metric, now - self.started, seconds)

    def count(self, name: str, at: float, n: int = 1) -> None:
        self.phase(at).counters[name] += n
        self.total[name] += n

    def error(self, code: str, at: float) -> None:
        self.phase(at).errors[code] += 1
        self.total["errors"] += 1

    def refusal(self, code: str, at: float) -> None:
        """A question the server refused (retryable): counted as refused, by code."""
        self.count("turns_refused", at)
        self.phase(at).refused[code] += 1

    def combined(self, names: tuple[str, ...] = PHASES) -> PhaseStats:
        merged = PhaseStats("all")
        for name in names:
            merged.add(self.phases[name])
        return merged

    def window(self, name: str) -> tuple[float, float]:
        """The phase's (from, to) in seconds since the start; empty when the phase did not happen.

        Any other name gets the load window: ramp-up and steady, without the drain.
        """
        finished = (self.finished if self.finished is not None else self.started) - self.started
        load_end = min(max(self.end_at - self.started, 0.0), finished)
        ramp = min(max(self.ramp_end - self.started, 0.0), load_end)
        if name == RAMP_UP:
            return (0.0, ramp)
        if name == STEADY:
            return (ramp, load_end)
        if name == DRAIN:
            return (load_end, finished)
        return (0.0, load_end)
