"""Preference data in three layouts -> one internal pair form, shared by ``rlhf reward`` and ``rlhf dpo``.

Layouts read (column names as in the file):

* ``explicit`` -- our export and TRL's explicit-prompt format: ``prompt``, ``chosen``,
  ``rejected``; each a string or a list of ``{role, content}`` messages; optional ``margin``;
  any other column (``annotator``, ``comparison_id``, ...) is ignored.
* ``dialogue`` -- HH-RLHF style: ``chosen`` / ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is their shared prefix up to the
  last ``"\\n\\nAssistant:"``, the rest of each string is the response.
* ``conversation`` -- UltraFeedback-binarized style: ``chosen`` / ``rejected`` are message
  lists; every turn but the last is the prompt (it must be the same in both), the last
  turn is the assistant response.

Every layout becomes a :class:`PreferencePair`: ``prompt`` (a message list), ``chosen`` and
``rejected`` (response texts, stripped) and ``margin`` (a float, or None when the data has none).
Everything here is pure except :func:`load_pairs`, which reads a dataset through
:func:`rlhf.data.load_table`.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.data import load_table
from rlhf.errors import DataError

Layout = Literal["explicit", "dialogue", "conversation"]
LAYOUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "explicit": ("prompt", "chosen", "rejected"),
    "dialogue": ("chosen", "rejected"),
    "conversation": ("chosen", "rejected"),
}
_USED = ("prompt", "chosen", "rejected", "margin")
ASSISTANT_MARK = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: ``chosen`` is preferred over ``rejected`` as the answer to ``prompt``."""

    prompt: tuple[dict, ...]  # messages, each {"role", "content"}; the last one is not the assistant's answer
    chosen: str
    rejected: str
    margin: float | None = None

    @property
    def prompt_messages(self) -> list[dict]:
        return [dict(m) for m in self.prompt]

    @property
    def prompt_key(self) -> str:
        """A canonical string of the prompt (pairs sharing it share a prompt)."""
        return json.dumps([[m["role"], m["content"]] for m in self.prompt], ensure_ascii=False)


# helper functions


def _messages(value: Any, what: str) -> list[dict]:
    """A string or a message list -> a clean message list (string = one user turn)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"column '{what}' must hold a string or a non-empty list of {{role, content}} messages")


def _response(value: Any, what: str) -> tuple[list[dict], str]:
    """A response given as a string or as messages -> (extra prompt turns, assistant text)."""
    if isinstance(value, str):
        return [], value.strip()
    messages = _messages(value, what)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"column '{what}': the last message must have role 'assistant', got '{messages[-1]['role']}'")
    return messages[:-1], messages[-1]["content"].strip()


def _margin(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"column 'margin' must hold finite numbers, got {value!r}")
    return float(value)


def parse_dialogue(text: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c"`` -> user/assistant/user messages."""
    parts = _TURN.split(text)
    head, rest = parts[0], parts[1:]
    if not rest:
        raise DataError("a dialogue has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    messages = []
    if head.strip():
        messages.append({"role": "user", "content": head.strip()})
    for speaker, content in zip(rest[0::2], rest[1::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    return messages


def split_dialogues(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """HH-RLHF pair -> (prompt messages, chosen response, rejected response).

    The prompt is the longest common prefix of both strings cut at its last ``"\\n\\nAssistant:"``.
    """
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT_MARK, 0, common)  # the last mark lying wholly inside the shared prefix
    if cut == -1:
        raise DataError("chosen and rejected dialogues share no prefix ending in '\\n\\nAssistant:'")
    end = cut + len(ASSISTANT_MARK)
    prompt = parse_dialogue(chosen[:cut])
    if prompt[-1]["role"] == "assistant":
        raise DataError("the shared dialogue prefix must end with a Human turn before the last '\\n\\nAssistant:'")
    return prompt, chosen[end:].strip(), rejected[end:].strip()


# layout detection and normalisation


def detect_layout(columns: list[str], first_row: dict | None = None) -> Layout:
    """Which layout a table with ``columns`` (and this first row) is in; DataError naming what is missing."""
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "explicit"
    if {"chosen", "rejected"} <= cols:
        sample = (first_row or {}).get("chosen")
        return "dialogue" if isinstance(sample, str) or sample is None else "conversation"
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    raise DataError(
        f"preference data needs columns prompt/chosen/rejected (or chosen/rejected with an implicit prompt); "
        f"missing: {', '.join(missing)}; it has: {', '.join(columns)}"
    )


def joined_turns(prompt: list[dict], more: list[dict]) -> list[dict]:
    """``prompt`` followed by the turns ``more`` (those before the answer in 'chosen' / 'rejected'), where ``more``
    may repeat the prompt's last turns or the whole of it: joined on the longest end of ``prompt`` that ``more``
    starts with ([q1] + [q1, a1, q2] -> [q1, a1, q2]; [system, q] + [q] -> [system, q])."""
    overlap = next((k for k in range(min(len(prompt), len(more)), 0, -1) if prompt[-k:] == more[:k]), 0)
    return prompt + more[overlap:]


def normalize_row(row: dict, layout: Layout) -> PreferencePair:
    """One record in ``layout`` -> a :class:`PreferencePair` (DataError on malformed values)."""
    for column in LAYOUT_COLUMNS[layout]:
        if row.get(column) is None:
            raise DataError(f"column '{column}' is empty")
    margin = _margin(row.get("margin"))
    if layout == "explicit":
        prompt = _messages(row["prompt"], "prompt")
        extra_c, chosen = _response(row["chosen"], "chosen")
        extra_r, rejected = _response(row["rejected"], "rejected")
        if extra_c != extra_r:
            raise DataError("columns 'chosen' and 'rejected' continue the prompt with different turns")
        prompt = joined_turns(prompt, extra_c)
    elif layout == "dialogue":
        if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            raise DataError("columns 'chosen' and 'rejected' must both be dialogue strings")
        prompt, chosen, rejected = split_dialogues(row["chosen"], row["rejected"])
    else:
        prompt_c, chosen = _response(row["chosen"], "chosen")
        prompt_r, rejected = _response(row["rejected"], "rejected")
        if prompt_c != prompt_r:
            raise DataError("columns 'chosen' and 'rejected' must share every turn but the last")
        prompt = prompt_c
    if not prompt:
        raise DataError("a pair has an empty prompt")
    if prompt[-1]["role"] == "assistant":
        raise DataError("a prompt must not end with an assistant turn")
    return PreferencePair(tuple(prompt), chosen, rejected, margin)


def normalize_rows(rows: list[dict], columns: list[str], source: str = "dataset") -> list[PreferencePair]:
    """All records of one table -> pairs; errors name the table, the row and the column."""
    if not rows:
        raise DataError(f"{source} is empty")
    layout = detect_layout(columns, rows[0])
    pairs = []
    for i, row in enumerate(rows):
        try:
            pairs.append(normalize_row(row, layout))
        except DataError as exc:
            raise DataError(f"{source} row {i}: {exc}") from None
    return pairs


def load_pairs(dataset_name: str) -> list[PreferencePair]:
    """Every pair of a preference dataset in any supported layout (DataError naming missing/bad columns)."""
    ds = load_table(dataset_name)
    layout = detect_layout(ds.column_names, ds[0])
    keep = [c for c in ds.column_names if c in _USED and (c in LAYOUT_COLUMNS[layout] or c == "margin")]
    rows = ds.select_columns(keep).to_list()
    return normalize_rows(rows, ds.column_names, source=f"dataset {dataset_name}")


def split_by_prompt(pairs: list[PreferencePair], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded ``eval_fraction`` of the distinct prompts, with all their pairs, is held out."""
    if eval_fraction <= 0:
        return list(pairs), []
    keys = sorted({p.prompt_key for p in pairs})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * eval_fraction))
    if n_eval >= len(keys):
        raise DataError(
            f"eval_fraction {eval_fraction} leaves no training prompts ({len(keys)} distinct prompts); "
            "add data, lower eval_fraction or set eval_dataset_name"
        )
    held = set(keys[:n_eval])
    return [p for p in pairs if p.prompt_key not in held], [p for p in pairs if p.prompt_key in held]


def load_splits(cfg) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train pairs, held-out pairs) of a stage config with ``dataset_name``, ``eval_dataset_name``,
    ``eval_fraction``, ``seed`` and ``max_train_samples`` (the reward and DPO stages): whole prompts held out
    by :func:`split_by_prompt`, or a separate held-out file."""
    pairs = load_pairs(cfg.dataset_name)
    if cfg.eval_dataset_name:
        train, held = pairs, load_pairs(cfg.eval_dataset_name)
    else:
        train, held = split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if not train:
        raise DataError(f"dataset {cfg.dataset_name} leaves no training pairs")
    return train, held
