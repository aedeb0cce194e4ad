"""The benchmark report: the disk probe and how ladder results become docs/benchmarks.md rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run_all
from benchmarks.harness import ProcessSample, fsync_probe
from benchmarks.run_all import render_doc


def test_fsync_probe_reports_ordered_percentiles_and_leaves_no_file(tmp_path: Path) -> None:
    probe = fsync_probe(tmp_path, seconds=0.3, pause_s=0.0)
    assert probe["syncs"] > 10
    assert 0 < probe["p50_ms"] <= probe["p99_ms"] <= probe["p999_ms"] <= probe["max_ms"]
    assert probe["over_50_ms"] <= probe["over_20_ms"] <= probe["syncs"]
    assert list(tmp_path.iterdir()) == []


def _step(rate: float, passed: bool, ack_p99: float) -> dict[str, Any]:
    sampled = {name: {"steady": {"cpu_cores": cores}} for name, cores in
               (("postgres", 0.3), ("redis", 0.1), ("loadgen", 0.15), ("machine", 1.2))}
    return {
        "rate": rate, "passed": passed, "noisy": False, "achieved_turns_per_s": rate, "ack_p50_ms": 3.0,
        "ack_p99_ms": ack_p99, "worst_second_ack_p99_ms": ack_p99 * 2, "done_p99_ms": ack_p99 + 5,
        "send_lag_p99_ms": 1.5, "server": {"cpu_cores": 0.5},
        "detail": {"sampled": sampled, "command": "smartedu loadtest --students 200 --rate 300"},
    }


def _ladder(best: float, failed_at: float) -> dict[str, Any]:
    return {
        "steps": [_step(best, True, 12.0), _step(failed_at, False, 60.0)],
        "max_turns_per_s": best, "command": "smartedu loadtest --rate 300", "turns": 0, "hellos": 0,
    }


def test_in_memory_ladder_gets_its_own_section_and_floor_ratio() -> None:
    summary = {
        "machine": {"fsync": {"directory": "/x", "seconds": 15, "syncs": 6000, "p50_ms": 0.17, "p99_ms": 1.0,
                              "p999_ms": 24.2, "max_ms": 151.7, "over_20_ms": 11, "over_50_ms": 2,
                              "same_filesystem": True}},
        "backends": {},
        "updated": {"throughput": "t1", "throughput_tmpfs": "t2", "floor": "t3"},
        "scenarios": {
            "throughput": {"runs": [_ladder(200, 250), _ladder(250, 300), _ladder(250, 300)]},
            "throughput_tmpfs": {"runs": [_ladder(350, 400), _ladder(300, 350), _ladder(350, 400)]},
            "floor": {"runs": [{"throughput": _ladder(1200, 1600)} for _ in range(3)]},
        },
    }
    doc = render_doc(summary, "\nnotes\n")

    assert "p99.9 24.2 ms, max 151.7 ms (11 over 20 ms)" in doc
    section_2, section_2b = doc.split("## 2. ")[1].split("## 2b. ")
    assert "| highest passing rate (turns/s) | 200 / 250 / 250 | ≥ 300 | **missed**" in section_2
    assert "| highest passing rate (turns/s) | 300 / 350 / 350 | ≥ 300 | **met** |" in section_2b
    # Every step of every run, passed or not.
    assert section_2b.count("| 400 | 400 |") == 2 and section_2b.count("| 350 | 350 |") == 3
    # Ours / floor for both ladders: 250 / 1200 and 350 / 1200.
    assert "| highest passing rate (turns/s) | 250 | 1,200 / 1,200 / 1,200 | 0.21" in doc
    assert "| highest passing rate, PostgreSQL data in memory (section 2b) | 350 | 1,200 / 1,200 / 1,200 | 0.29" in doc


def test_the_durable_floor_gets_its_section_with_both_ratios() -> None:
    summary: dict[str, Any] = {
        "machine": {}, "backends": {}, "updated": {"durable_floor": "t4"},
        "scenarios": {
            "throughput_tmpfs": {"runs": [_ladder(350, 400), _ladder(300, 350), _ladder(350, 400)]},
            "floor": {"runs": [{"throughput": _ladder(4000, 5000)} for _ in range(3)]},
            "durable_floor": {"runs": [_ladder(1000, 1200), _ladder(1400, 1600), _ladder(1400, 1600)]},
        },
    }
    section = render_doc(summary, "\nnotes\n").split("## 5b. ")[1].split("## ")[0]
    assert "_Measured t4, 3 runs._" in section
    assert "| highest passing rate (turns/s) | 1,000 / 1,400 / 1,400 |" in section
    assert "| durable floor / floor (median) | 0.35 |" in section  # 1,400 / 4,000
    assert "| ours in memory (section 2b) / durable floor (medians) | 0.25 |" in section  # 350 / 1,400
    assert section.count("| 1600 | 1,600 |") == 2 and section.count("| 1000 | 1,000 |") == 1


def test_a_ladder_that_never_failed_says_its_limit_is_higher() -> None:
    passed_all = {
        "steps": [_step(900, True, 9.0), _step(1000, True, 11.0)],
        "max_turns_per_s": 1000.0, "command": "smartedu loadtest --rate 1000", "turns": 0, "hellos": 0,
    }
    summary: dict[str, Any] = {
        "machine": {}, "backends": {}, "updated": {"throughput": "t1", "throughput_tmpfs": "t2"},
        "scenarios": {
            "throughput": {"runs": [_ladder(800, 900), passed_all, _ladder(900, 1000)]},
            "throughput_tmpfs": {"runs": [_ladder(800, 900), _ladder(700, 800), _ladder(800, 900)]},
        },
    }
    section_2, section_2b = render_doc(summary, "\nnotes\n").split("## 2. ")[1].split("## 2b. ")
    assert ("| highest passing rate (turns/s) | 800 / 900 / 1,000 (every step passed in some run: the limit is "
            "higher) | ≥ 300 | **met** |") in section_2
    assert "| highest passing rate (turns/s) | 700 / 800 / 800 | ≥ 300 | **met** |" in section_2b


def test_sampler_cpu_of_a_group_never_drops_when_a_process_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL backends and load generators come and go during a run: a group's CPU counts what its
    processes used while sampled, so a window across an exit is not negative (nor a new process's past
    missed)."""
    cpu = {1: 10.0, 2: 5.0}
    alive = [1, 2]
    monkeypatch.setattr(run_all, "read_sample", lambda pid: ProcessSample(time.monotonic(), cpu[pid], 1, 1, 1))
    sampler = run_all.Sampler({"postgres": lambda: list(alive)})
    sampler._take()  # the baseline
    cpu[1], cpu[2] = 11.0, 6.0
    sampler._take()  # +2
    alive.remove(2)
    cpu[1] = 11.5
    sampler._take()  # +0.5: the second backend exited
    alive.append(3)
    cpu[3] = 0.25
    sampler._take()  # +0.25: a new backend's CPU so far
    assert [taken["postgres"].cpu_s for _, taken in sampler.samples] == [0.0, 2.0, 2.5, 2.75]
    start, end = sampler.samples[1][0], sampler.samples[2][0]
    assert sampler.window("postgres", start, end)["cpu_cores"] >= 0  # type: ignore[operator]


def test_the_profiled_rate_is_the_one_asked_for_else_the_best_ladder_median() -> None:
    summary: dict[str, Any] = {
        "scenarios": {
            "throughput": {"runs": [_ladder(600, 800), _ladder(600, 800), _ladder(800, 1000)]},
            "throughput_tmpfs": {"runs": [_ladder(200, 250), _ladder(400, 500), _ladder(600, 800)]},
        },
    }
    assert run_all.profile_rate(summary) == 600  # the disk ladder's median beats the in-memory one's 400
    assert run_all.profile_rate(summary, 400) == 400  # --profile-rate wins
    assert run_all.profile_rate({"scenarios": {}}) == run_all.TARGET_TURNS_PER_S  # no ladder ran yet
