"""Instruction data in the book's Alpaca format (chapter 7): loading, checking, the prompt template
and the book's split. Finetuning (`jaxgpt.finetune.instruct`) and task evaluation use them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from jaxgpt.data.corpus import DataError

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_MARKER = "\n\n### Response:\n"


def load_instruction_data(path: Path) -> list[dict]:
    """A JSON list of {"instruction", "input", "output"} entries (the book's instruction-data.json)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction data not found at {path} (set JAXGPT_DATA_DIR or pass --data)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    check_entries(data, path)
    return data


def check_entries(data, path, fields: Sequence[str] = ("instruction", "output")) -> None:
    """Refuse, naming the entry and field, anything but a non-empty list of objects whose `fields`
    (and "input", when present) are strings."""
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is a {type(entry).__name__}, not an object with {list(fields)}")
        for field in (*fields, "input"):
            if field not in entry and field != "input":
                raise DataError(f"{path}: entry {i} has no {field!r} field (needs {list(fields)}, optionally 'input')")
            if field in entry and not isinstance(entry[field], str):
                raise DataError(f"{path}: entry {i} field {field!r} is a {type(entry[field]).__name__}, not text")


def format_input(entry: dict) -> str:
    """The book's Alpaca prompt: preamble, instruction, and the input only when it is non-empty."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else "")


def format_example(entry: dict) -> str:
    """Prompt + "### Response:" + the reference output: one training sequence."""
    return format_input(entry) + RESPONSE_MARKER + entry["output"]


def book_split(data: Sequence[dict]) -> tuple[list, list, list]:
    """The book's 85/5/10 split, in file order: train data[:85%], test the next 10%, val the rest."""
    n_train, n_test = int(len(data) * 0.85), int(len(data) * 0.1)
    return list(data[:n_train]), list(data[n_train + n_test:]), list(data[n_train:n_train + n_test])
