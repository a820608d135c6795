"""Candidates: K responses per prompt from a policy, gold items, and the comparisons built on them.

Re-running is additive and never duplicates: prompts are keyed by a hash of
their messages, responses by (prompt, hash of the text), comparisons by a hash
of their kind and response ids; a prompt that already has K responses from
the same policy is not sampled again.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_ui.config import LabelCandidatesConfig
from feedback_ui.store import Comparison, Prompt, Response, Store, init_db, set_setting, sha256_hex
from rlhf.data import to_messages
from rlhf.errors import DataError

STORE_EVERY_BATCHES = 8  # generation batches between database writes
MAX_RANK = 8  # responses in one ranking task (the app's ranking slots)


# helper functions


def prompt_display_text(messages: list[dict]) -> str:
    """The text labelers read and export writes: the content of a lone user turn, else a transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def prompt_key(prompt: Any) -> str:
    """sha256 of the prompt's canonical messages JSON (a string prompt is one user message)."""
    return sha256_hex(json.dumps(to_messages(prompt), sort_keys=True, ensure_ascii=False))


def policy_identity(model_name_or_path: str, adapter: Optional[str]) -> str:
    return model_name_or_path + (f" + adapter {Path(adapter).resolve()}" if adapter else "")


# rows


def get_or_add_prompt(session: Session, prompt: Any) -> Prompt:
    key = prompt_key(prompt)
    row = session.scalar(sa.select(Prompt).where(Prompt.key == key))
    if row is None:
        messages = to_messages(prompt)
        row = Prompt(key=key, text=prompt_display_text(messages), messages=messages)
        session.add(row)
        session.flush()
    return row


def add_response(session: Session, prompt_id: int, text: str, *, source: str, **fields) -> Response:
    """This prompt's response with this text, created if new.

    ``fields``: policy, settings, author_id, parent_id (used only when created).
    """
    key = sha256_hex(text)
    row = session.scalar(sa.select(Response).where(Response.prompt_id == prompt_id, Response.text_key == key))
    if row is None:
        row = Response(prompt_id=prompt_id, text=text, text_key=key, source=source, **fields)
        session.add(row)
        session.flush()
    return row


def add_comparison(
    session: Session,
    prompt_id: int,
    response_ids: list[int],
    *,
    overlap: int = 1,
    gold_ranking: Optional[list[int]] = None,
) -> Optional[Comparison]:
    """A pair (2 ids) or K-wise ranking comparison; None when it already exists or has < 2 distinct ids."""
    ids = sorted(set(response_ids))
    if len(ids) < 2:
        return None
    kind = "pair" if len(ids) == 2 else "rank"
    key = sha256_hex(f"{kind}:{ids}:{'gold' if gold_ranking else 'task'}")
    if session.scalar(sa.select(Comparison.id).where(Comparison.key == key)) is not None:
        return None
    row = Comparison(
        prompt_id=prompt_id,
        kind=kind,
        response_ids=ids,
        key=key,
        overlap=overlap,
        is_gold=gold_ranking is not None,
        gold_ranking=gold_ranking,
    )
    session.add(row)
    return row


def build_comparisons(session: Session, prompt_id: int, response_ids: list[int], mode: str, overlap: int,
                      group_of: Optional[dict[int, str]] = None) -> int:  # fmt: skip
    """pairwise: every pair of the responses; ranking: one comparison of all of them. Returns how many are new.

    With ``group_of`` (response id -> its model), pairwise builds only pairs of responses of different models.
    """
    ids = sorted(set(response_ids))
    if mode == "pairwise":
        groups = [g for g in itertools.combinations(ids, 2) if group_of is None or group_of[g[0]] != group_of[g[1]]]
    else:
        groups = [ids]
    return sum(add_comparison(session, prompt_id, list(g), overlap=overlap) is not None for g in groups)


def add_candidates(
    store: Store,
    prompt: Any,
    responses: list[str],
    *,
    policy: str,
    settings: Optional[dict] = None,
    mode: str = "pairwise",
    overlap: int = 1,
) -> tuple[int, int]:
    """Store one prompt's responses from ``policy``, build its comparisons; returns (new responses, new comparisons)."""
    with store.write() as s:
        p = get_or_add_prompt(s, prompt)
        before = s.scalar(sa.select(sa.func.count()).select_from(Response).where(Response.prompt_id == p.id))
        for text in responses:
            add_response(s, p.id, text, source="policy", policy=policy, settings=settings)
        after = s.scalar(sa.select(sa.func.count()).select_from(Response).where(Response.prompt_id == p.id))
        ids = s.scalars(
            sa.select(Response.id).where(
                Response.prompt_id == p.id, Response.source == "policy", Response.policy == policy
            )
        ).all()
        return after - before, build_comparisons(s, p.id, list(ids), mode, overlap)


def read_gold(path: str) -> list[dict]:
    """The rows ``{prompt, chosen, rejected}`` of a gold JSONL file, checked (DataError naming the line)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"gold file not found: {file}")
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{file}:{n} is not valid JSON") from None
        if not isinstance(row, dict) or "prompt" not in row or not all(
            isinstance(row.get(k), str) for k in ("chosen", "rejected")
        ):
            raise DataError(f"{file}:{n} needs string 'chosen' and 'rejected' and a 'prompt'")
        if row["chosen"] == row["rejected"]:
            raise DataError(f"{file}:{n} has the same text as chosen and rejected")
        rows.append(row)
    return rows


def import_gold(store: Store, path: str, rows: list[dict] | None = None) -> int:
    """Gold items from JSONL rows ``{prompt, chosen, rejected}`` (``rows``: read already); returns the new ones."""
    rows = read_gold(path) if rows is None else rows
    created = 0
    with store.write() as s:
        for row in rows:
            p = get_or_add_prompt(s, row["prompt"])
            chosen = add_response(s, p.id, row["chosen"], source="gold")
            rejected = add_response(s, p.id, row["rejected"], source="gold")
            ranking = [chosen.id, rejected.id]
            created += add_comparison(s, p.id, ranking, gold_ranking=ranking) is not None
    return created


# the stage


def _existing_counts(store: Store, prompts: list[Any], policy: str) -> list[int]:
    with store.read() as s:
        counts = dict(
            s.execute(
                sa.select(Prompt.key, sa.func.count(Response.id))
                .join(Response, Response.prompt_id == Prompt.id)
                .where(Response.source == "policy", Response.policy == policy)
                .group_by(Prompt.key)
            ).all()
        )
    return [counts.get(prompt_key(p), 0) for p in prompts]


def run_label_candidates(cfg: LabelCandidatesConfig) -> dict:
    """Sample the missing responses (K per prompt and policy), store them, build comparisons.

    Work is stored after every chunk of prompts, so an interrupted run keeps
    what it generated and a re-run continues where it stopped.
    """
    from rlhf.data import load_prompts
    from rlhf.models import check_adapter, resolve_model_path

    # every input is checked before the database is touched
    prompts = load_prompts(cfg.dataset_name, cfg.max_prompts)
    if not prompts:
        raise DataError(f"dataset {cfg.dataset_name} has no prompts")
    gold_rows = read_gold(cfg.gold_file) if cfg.gold_file else []
    resolve_model_path(cfg.model_name_or_path)
    if cfg.adapter:
        check_adapter(cfg.adapter)
    store = init_db(cfg.db)
    policy = policy_identity(cfg.model_name_or_path, cfg.adapter)
    settings = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")}
    settings["dataset_name"] = cfg.dataset_name
    need = [max(0, cfg.num_candidates - have) for have in _existing_counts(store, prompts, policy)]
    sampled = new_responses = new_comparisons = 0

    def keep(i: int, texts: list[str]) -> None:
        nonlocal sampled, new_responses, new_comparisons
        n_resp, n_comp = add_candidates(store, prompts[i], texts, policy=policy, settings=settings, mode=cfg.mode,
                                        overlap=cfg.overlap)  # fmt: skip
        sampled, new_responses, new_comparisons = sampled + len(texts), new_responses + n_resp, new_comparisons + n_comp

    todo = [i for i, n in enumerate(need) if n]
    if todo:
        from rlhf.generation import generate_responses
        from rlhf.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(cfg.model_name_or_path, padding_side="left")
        model = load_model(cfg.model_name_or_path, adapter=cfg.adapter)
        chunk = cfg.batch_size * STORE_EVERY_BATCHES
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            for k in sorted({need[i] for i in part}):
                idx = [i for i in part if need[i] == k]
                outs = generate_responses(
                    model, tokenizer, [prompts[i] for i in idx], num_return_sequences=k,
                    max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                    top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed + start, progress=True,
                )  # fmt: skip
                for i, texts in zip(idx, outs):
                    keep(i, texts)  # stored right away: an interrupted run keeps its work
    for i, n in enumerate(need):
        if not n:
            keep(i, [])  # comparisons over stored responses (e.g. the other mode)
    gold = import_gold(store, cfg.gold_file, gold_rows) if cfg.gold_file else 0
    with store.write() as s:
        set_setting(s, "gold_rate", cfg.gold_rate)
    store.close()
    summary = {
        "prompts": len(prompts),
        "responses_sampled": sampled,
        "new_responses": new_responses,
        "new_comparisons": new_comparisons,
        "new_gold": gold,
        "policy": policy,
    }
    print(
        f"{len(prompts)} prompts: {summary['responses_sampled']} responses sampled, {new_responses} new responses, "
        f"{new_comparisons} new comparisons, {gold} new gold items -> {cfg.db}"
    )
    return summary
