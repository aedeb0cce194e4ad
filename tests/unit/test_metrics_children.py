"""The series counted with every answer look their labelled children up once, and still count right."""

from __future__ import annotations

from typing import Any

import pytest

from server.metrics import Metrics


def test_answer_series_count_right_and_bind_their_children_once(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics("replica-a")
    lookups: list[str] = []
    for name in ("turns", "ttft", "duration"):
        series = getattr(metrics, name)
        original = series.labels

        def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            lookups.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(series, "labels", counted)
    for _ in range(3):
        metrics.turn_ended("complete")
        metrics.answer_timed("offline", "offline-tutor", 0.2, 1.5)
    metrics.turn_ended("interrupted")
    metrics.answer_timed("offline", "offline-tutor", None, 0.5)

    value = metrics.registry.get_sample_value
    labels = {"provider": "offline", "model": "offline-tutor"}
    assert value("smartedu_turns_total", {"status": "complete"}) == 3
    assert value("smartedu_turns_total", {"status": "interrupted"}) == 1
    assert value("smartedu_ai_ttft_seconds_count", labels) == 3
    assert value("smartedu_ai_duration_seconds_count", labels) == 4
    assert value("smartedu_ai_duration_seconds_sum", labels) == 5.0
    assert sorted(lookups) == ["duration", "ttft", "turns", "turns"]
