"""JSON text whose objects name each key once: `json.loads` keeps the last of a key given twice
(`{"text": "a", "text": "b"}` reads as `{"text": "b"}`) silently, so a line that gives one twice
is refused by every reader of JSON lines (a corpus line, an evaluation item)."""

from __future__ import annotations

import json


class RepeatedKeyError(Exception):
    """An object of a JSON text names `key` twice. Not a ValueError, so that a reader's
    `except ValueError` for text that is no JSON does not take it for one."""

    def __init__(self, key: str):
        super().__init__(f"the key {key!r} appears twice in one object (JSON would keep the last "
                         f"one silently); keep one")
        self.key = key


def _object_of_unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise RepeatedKeyError(key)
        record[key] = value
    return record


def loads_unique_keys(text: str) -> object:
    """`json.loads(text)`, raising `RepeatedKeyError` at an object that names a key twice
    (and whatever `json.loads` raises for text that is no JSON)."""
    return json.loads(text, object_pairs_hook=_object_of_unique_keys)
