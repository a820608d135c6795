"""``rlhf label import``: responses made elsewhere (``prompt``, ``response``, ``model``) -> comparisons.

Responses of different models to the same prompt are compared: every cross-model pair (pairwise), or one
K-wise ranking of all of the prompt's imported responses (ranking). Rows go through the same pieces as
``rlhf label candidates`` (:mod:`feedback_ui.candidates`): prompts keyed by a hash of their messages,
responses by (prompt, hash of the text), comparisons by a hash of their kind and response ids, so importing
the same file again adds nothing and a file with new rows adds only what they bring. A prompt whose
responses (counting those imported before) come from one model only is skipped and counted, not an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from feedback_ui.candidates import add_response, build_comparisons, get_or_add_prompt, prompt_key
from feedback_ui.config import MAX_RANK
from feedback_ui.db_url import shown_db
from feedback_ui.store import Response, Store, has_nul, init_db
from rlhf.data import to_messages
from rlhf.errors import DataError

COLUMNS = ("prompt", "response", "model")
SOURCE = "import"  # responses.source of imported rows
PROMPTS_PER_TRANSACTION = 200

MODEL_NAME_MAX = Response.policy.type.length  # the column's size (1024)


def read_responses(path: str) -> list[dict]:
    """The rows of a JSONL file, each checked: ``prompt`` (string or messages), ``response`` and ``model``
    (non-empty strings). A DataError names the file, the line and the problem."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"responses file not found: {file}" + (" (it is a folder)" if file.is_dir() else ""))
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{file} is not UTF-8 text (expected JSON lines)") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{n} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{file}:{n} must be a JSON object with {', '.join(COLUMNS)}")
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise DataError(f"{file}:{n} has no column {', '.join(repr(c) for c in missing)} "
                            f"(each line needs {', '.join(COLUMNS)})")  # fmt: skip
        for column in ("response", "model"):
            if not isinstance(row[column], str) or not row[column].strip():
                raise DataError(f"{file}:{n}: '{column}' must be a non-empty string")
        try:
            to_messages(row["prompt"])
        except DataError as exc:
            raise DataError(f"{file}:{n}: {exc}") from None
        if has_nul([row["prompt"], row["response"], row["model"]]):
            raise DataError(f"{file}:{n} holds a NUL character (\\u0000), which the database cannot store")
        if len(row["model"].strip()) > MODEL_NAME_MAX:
            raise DataError(f"{file}:{n}: 'model' is longer than {MODEL_NAME_MAX} characters")
        rows.append({"prompt": row["prompt"], "response": row["response"], "model": row["model"].strip()})
    if not rows:
        raise DataError(f"{file} has no rows (expected JSON lines with {', '.join(COLUMNS)})")
    return rows


def _by_prompt(rows: list[dict]) -> list[tuple[Any, list[dict]]]:
    """Rows grouped by prompt (same messages = same prompt), in file order."""
    groups: dict[str, tuple[Any, list[dict]]] = {}
    for row in rows:
        groups.setdefault(prompt_key(row["prompt"]), (row["prompt"], []))[1].append(row)
    return list(groups.values())


def import_responses(store: Store, rows: list[dict], *, mode: str = "pairwise", overlap: int = 1) -> dict:
    """Store the rows and build cross-model comparisons; returns counts (new rows only count once)."""
    counts = {"rows": len(rows), "prompts": 0, "new_responses": 0, "new_comparisons": 0, "one_model": 0,
              "too_many": 0}  # fmt: skip
    groups = _by_prompt(rows)
    counts["prompts"] = len(groups)
    for start in range(0, len(groups), PROMPTS_PER_TRANSACTION):
        with store.write() as s:
            for prompt, items in groups[start : start + PROMPTS_PER_TRANSACTION]:
                p = get_or_add_prompt(s, prompt)
                stored = sa.select(sa.func.count()).select_from(Response).where(Response.prompt_id == p.id)
                before = s.scalar(stored)
                for row in items:
                    add_response(s, p.id, row["response"], source=SOURCE, policy=row["model"])
                counts["new_responses"] += s.scalar(stored) - before
                models = dict(s.execute(sa.select(Response.id, Response.policy).where(
                    Response.prompt_id == p.id, Response.source == SOURCE)).all())  # fmt: skip
                if len(set(models.values())) < 2:
                    counts["one_model"] += 1
                    continue
                if mode == "ranking" and len(models) > MAX_RANK:
                    counts["too_many"] += 1
                    continue
                counts["new_comparisons"] += build_comparisons(s, p.id, list(models), mode, overlap, group_of=models)
    return counts


def _prompts(n: int) -> str:
    return f"{n} prompt{'s' * (n != 1)}"


def run_label_import(db: str, path: str, *, mode: str = "pairwise", overlap: int = 1) -> dict:
    """``rlhf label import``: check the file (before the database is touched), import it, print a summary."""
    rows = read_responses(path)
    with init_db(db) as store:
        counts = import_responses(store, rows, mode=mode, overlap=overlap)
    line = (f"{counts['rows']} rows, {_prompts(counts['prompts'])}: {counts['new_responses']} new responses, "
            f"{counts['new_comparisons']} new comparisons")  # fmt: skip
    if counts["one_model"]:
        line += f"; {_prompts(counts['one_model'])} skipped (responses from one model only)"
    if counts["too_many"]:
        line += f"; {_prompts(counts['too_many'])} skipped (more than {MAX_RANK} responses for one ranking)"
    print(f"{line} -> {shown_db(db)}")
    return counts
