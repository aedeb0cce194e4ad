"""LogSnapshot.covers: whether a resume from a seq can be served from the log alone."""

from __future__ import annotations

from storage.redis_store import LogSnapshot


def _log(seq: int, first: int, complete_after: int) -> LogSnapshot:
    return LogSnapshot(seq, [(s, b"{}") for s in range(first, seq + 1)], complete_after)


def test_a_log_holding_everything_after_the_seq_covers_it() -> None:
    log = _log(10, 4, 3)
    assert [after for after in range(0, 12) if log.covers(after)] == [3, 4, 5, 6, 7, 8, 9, 10]


def test_a_seq_beyond_the_counter_is_not_covered() -> None:
    # Numbered before Redis lost the conversation's counter (or made up): frames may be missing.
    assert not _log(10, 4, 3).covers(11)
    empty = LogSnapshot(0, [], 0)
    assert empty.covers(0) and not empty.covers(1) and not empty.covers(1_000_000_000)


def test_a_counter_behind_the_durable_mark_covers_nothing() -> None:
    # Redis lost the conversation (PostgreSQL committed seq 50): what came before is not in the log.
    assert not LogSnapshot(0, [], 0).covers(0, durable=50)
    assert not LogSnapshot(0, [], 0).covers(50, durable=50)
    restarted = _log(53, 51, 50)  # numbering went on above the durable mark
    assert restarted.covers(50, durable=50) and restarted.covers(53, durable=50)
    assert not restarted.covers(49, durable=50)
