"""The prompts of `lst-generate --prompts FILE`: JSON Lines, one prompt per line.

    {"id": "story-1", "text": "once upon a time"}
    {"id": 7, "units": [12, 12, 431, 7]}
    {"text": "the girl ran"}

Each line is one object holding exactly one of `"text"` (a string) or `"units"` (unit values, as
`--prompt-units` takes them), and an optional `"id"` (a non-empty string or an integer; by
default the line's number), unique in the file. Blank lines are skipped. Any other key is
refused (a misspelt key would otherwise be ignored). A text is checked as `--prompt-text` is
(`generation.check_text_prompt`: not empty, no lone surrogate), before the model loads. The file
is read as evaluation item files are (`items.records_with_unique_ids`: UTF-8, bounded size,
editor line numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_lst.evaluation.generation import GenerationError, check_text_prompt
from megatron_lst.evaluation.items import ItemError, records_with_unique_ids

_KEYS = ("id", "text", "units")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    where: str
    """`FILE:LINE`, for messages."""
    text: str | None = None
    units: list[int] | None = None


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """The prompts of `path`, in file order; an ItemError naming the file and line of the first
    bad one, or the file when it holds none."""
    return records_with_unique_ids(Path(path), "prompts file", "a prompt", _prompt,
                                   "write one JSON object per line, {\"text\": ...} or "
                                   "{\"units\": [...]}")


def _prompt(record: object, number: int, where: str) -> PromptRecord:
    if not isinstance(record, dict):
        raise ItemError(f"{where}: a prompt must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_KEYS))
    if unknown:
        raise ItemError(f"{where}: unknown key {unknown[0]!r}; a prompt holds \"text\" or "
                        f"\"units\", and an optional \"id\"")
    prompt_id = record.get("id", number)
    if (not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool)
            or not str(prompt_id).strip()):
        raise ItemError(f"{where}: \"id\" must be a non-empty string or an integer, got "
                        f"{prompt_id!r}")
    if ("text" in record) == ("units" in record):
        raise ItemError(f"{where}: give exactly one of \"text\" and \"units\"")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ItemError(f"{where}: \"text\" must be a string, got "
                            f"{type(record['text']).__name__}")
        try:  # refused now, not after minutes of loading the model
            check_text_prompt(record["text"])
        except GenerationError as error:
            raise ItemError(f"{where}: {error}") from None
        return PromptRecord(str(prompt_id), where, text=record["text"])
    units = record["units"]
    if (not isinstance(units, list) or not units
            or not all(isinstance(u, int) and not isinstance(u, bool) for u in units)):
        raise ItemError(f"{where}: \"units\" must be a non-empty list of integer unit values")
    return PromptRecord(str(prompt_id), where, units=units)
