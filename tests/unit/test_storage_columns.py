"""Rows are turned into models by position: the selected columns must follow the models' fields."""

from __future__ import annotations

import dataclasses
import re

from storage.models import Message, PastMessage
from storage.postgres import _HISTORY_COLUMNS, _MESSAGE_COLUMNS


def _names(columns: str) -> list[str]:
    """The result names of a SELECT list: the alias after AS, else the column itself."""
    names = []
    for item in columns.split(","):
        match = re.search(r"\bAS\s+(\w+)\s*$", item.strip(), flags=re.IGNORECASE)
        names.append(match.group(1) if match else item.strip())
    return names


def test_message_columns_follow_the_message_fields() -> None:
    assert _names(_MESSAGE_COLUMNS) == [f.name for f in dataclasses.fields(Message)]


def test_history_columns_hold_a_past_message_in_the_message_columns_places() -> None:
    places = _names(_MESSAGE_COLUMNS)
    history = [column.strip() for column in _HISTORY_COLUMNS.split(",")]
    assert len(history) == len(places)  # one UNION with the question's and the placeholder's rows
    kept = {places[i]: column.removeprefix("h.") for i, column in enumerate(history) if column != "NULL"}
    assert kept == {name: name for name in PastMessage._fields}
