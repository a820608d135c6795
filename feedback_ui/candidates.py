"""Candidates: K responses per prompt from a policy, gold items, and the comparisons built on them.

Re-running is additive and never duplicates: prompts are keyed by a hash of
their messages, responses by (prompt, hash of the text), comparisons by a hash
of their kind and response ids; a prompt that already has K responses from
the same policy is not sampled again.

Active labeling (``selection: random|uncertainty``): every response is stored
first, then only ``label_budget`` comparisons of this policy on these prompts
are created, drawn at random or picked by the reward model's uncertainty
(:mod:`feedback_ui.selection`); a re-run tops the count up to the budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_ui.config import LabelCandidatesConfig
from feedback_ui.db_url import shown_db
from feedback_ui.store import Comparison, Prompt, Response, Store, has_nul, init_db, set_setting, sha256_hex
from rlhf.data import to_messages
from rlhf.errors import DataError

STORE_EVERY_BATCHES = 8  # generation batches between database writes


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


def comparison_key(response_ids: list[int], gold: bool = False) -> str:
    """The key of the comparison of these (distinct, sorted) response ids."""
    ids = sorted(set(response_ids))
    kind = "pair" if len(ids) == 2 else "rank"
    return sha256_hex(f"{kind}:{ids}:{'gold' if gold else 'task'}")


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
    key = comparison_key(ids, gold=gold_ranking is not None)
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


def comparison_groups(response_ids: list[int], mode: str, group_of: Optional[dict[int, str]] = None) -> list[list[int]]:
    """pairwise: every pair of the responses; ranking: one group of all of them (sorted ids).

    With ``group_of`` (response id -> its model), pairwise gives only pairs of responses of different models.
    """
    ids = sorted(set(response_ids))
    if mode == "pairwise":
        return [list(g) for g in itertools.combinations(ids, 2) if group_of is None or group_of[g[0]] != group_of[g[1]]]
    return [ids] if len(ids) >= 2 else []


def build_comparisons(session: Session, prompt_id: int, response_ids: list[int], mode: str, overlap: int,
                      group_of: Optional[dict[int, str]] = None) -> int:  # fmt: skip
    """The comparisons of :func:`comparison_groups`; returns how many are new."""
    groups = comparison_groups(response_ids, mode, group_of)
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
    compare: bool = True,
) -> tuple[int, int]:
    """Store one prompt's responses from ``policy``, build its comparisons (unless ``compare`` is False);
    returns (new responses, new comparisons)."""
    with store.write() as s:
        p = get_or_add_prompt(s, prompt)
        before = s.scalar(sa.select(sa.func.count()).select_from(Response).where(Response.prompt_id == p.id))
        for text in responses:  # a NUL a model wrote is dropped (the database cannot store it)
            add_response(s, p.id, text.replace("\x00", ""), source="policy", policy=policy, settings=settings)
        after = s.scalar(sa.select(sa.func.count()).select_from(Response).where(Response.prompt_id == p.id))
        if not compare:
            return after - before, 0
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
        if has_nul([row["prompt"], row["chosen"], row["rejected"]]):
            raise DataError(f"{file}:{n} holds a NUL character (\\u0000), which the database cannot store")
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


# active labeling


@dataclasses.dataclass(frozen=True)
class CandidateComparison:
    """A comparison that could be created: its prompt, sorted response ids and their texts."""

    prompt_id: int
    messages: list
    response_ids: tuple[int, ...]
    texts: tuple[str, ...]


def candidate_pool(store: Store, prompts: list[Any], policy: str, mode: str) -> tuple[list[CandidateComparison], int]:
    """The comparisons not created yet among ``policy``'s responses to ``prompts``, and how many exist already."""
    keys = {prompt_key(p) for p in prompts}
    pool, existing = [], 0
    with store.read() as s:
        rows = s.execute(
            sa.select(Prompt.id, Prompt.key, Prompt.messages, Response.id, Response.text)
            .join(Response, Response.prompt_id == Prompt.id)
            .where(Response.source == "policy", Response.policy == policy)
            .order_by(Prompt.id, Response.id)
        ).all()
        by_prompt: dict[int, tuple[list, dict[int, str]]] = {}
        for prompt_id, key, messages, response_id, text in rows:
            if key in keys:
                by_prompt.setdefault(prompt_id, (messages, {}))[1][response_id] = text
        task_keys = {}
        if by_prompt:
            task_keys = dict(s.execute(
                sa.select(Comparison.key, Comparison.response_ids)
                .where(Comparison.prompt_id.in_(list(by_prompt)), ~Comparison.is_gold)
            ).all())  # fmt: skip
    for prompt_id, (messages, texts) in by_prompt.items():
        ours = set(texts)
        existing += sum(set(ids) <= ours and (len(ids) == 2) == (mode == "pairwise") for ids in task_keys.values())
        for group in comparison_groups(list(texts), mode):
            if comparison_key(group) not in task_keys:
                pool.append(CandidateComparison(prompt_id, messages, tuple(group), tuple(texts[i] for i in group)))
    return pool, existing


def check_reward_model(path: str) -> None:
    """A reward model folder written by ``rlhf reward`` (UserError naming what is wrong), read but not loaded."""
    from reward.modeling import read_metadata

    read_metadata(path)


def load_reward_scorer(path: str):
    """The reward model at ``path`` (``reward.RewardScorer``; an ensemble scores every member)."""
    from reward import RewardScorer

    return RewardScorer.from_pretrained(path)


def choose_comparisons(pool: list[CandidateComparison], budget: int, cfg: LabelCandidatesConfig) -> list[int]:
    """Indices into ``pool`` of the ``budget`` comparisons to create (random, or the most uncertain pairs)."""
    from feedback_ui.selection import most_uncertain, pair_uncertainties, random_selection

    if cfg.selection == "random" or budget >= len(pool):
        return random_selection(len(pool), budget, cfg.seed)
    index: dict[int, int] = {}  # response id -> position in the scored lists
    prompts, texts = [], []
    for cand in pool:
        for rid, text in zip(cand.response_ids, cand.texts):
            if rid not in index:
                index[rid] = len(texts)
                prompts.append(cand.messages)
                texts.append(text)
    rewards = load_reward_scorer(cfg.reward_model).score_members(prompts, texts)  # (K, R)
    pairs = [(index[c.response_ids[0]], index[c.response_ids[1]]) for c in pool]
    return most_uncertain(pair_uncertainties(rewards, pairs), budget)


def add_selected_comparisons(store: Store, prompts: list[Any], policy: str, cfg: LabelCandidatesConfig) -> dict:
    """Create up to ``label_budget`` comparisons of ``policy`` on ``prompts`` (counting those already there)."""
    pool, existing = candidate_pool(store, prompts, policy, cfg.mode)
    budget = max(0, cfg.label_budget - existing)
    chosen = choose_comparisons(pool, budget, cfg) if budget and pool else []
    with store.write() as s:
        created = sum(
            add_comparison(s, pool[i].prompt_id, list(pool[i].response_ids), overlap=cfg.overlap) is not None
            for i in chosen
        )
    return {"candidate_comparisons": len(pool) + existing, "already_selected": existing, "selected": created}


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
    from feedback_ui.db_url import normalize_url, sqlite_path
    from rlhf.data import load_prompts
    from rlhf.models import check_adapter, load_model, load_tokenizer, resolve_model_path

    # every input is checked before the database is touched
    prompts = load_prompts(cfg.dataset_name, cfg.max_prompts)
    if not prompts:
        raise DataError(f"dataset {cfg.dataset_name} has no prompts")
    with_nul = next((i for i, prompt in enumerate(prompts) if has_nul(prompt)), None)
    if with_nul is not None:
        raise DataError(f"dataset {cfg.dataset_name}: prompt {with_nul + 1} holds a NUL character (\\u0000), which "
                        "the database cannot store")
    gold_rows = read_gold(cfg.gold_file) if cfg.gold_file else []
    resolve_model_path(cfg.model_name_or_path)
    if cfg.adapter:
        check_adapter(cfg.adapter, hooked=True)  # load_model attaches LoReFT / bottleneck adapters too
    if cfg.reward_model:
        check_reward_model(cfg.reward_model)
    select = cfg.selection != "all"
    tokenizer = load_tokenizer(cfg.model_name_or_path, padding_side="left")
    new_file = sqlite_path(normalize_url(cfg.db))
    # a new SQLite file is made only once the policy has loaded (an existing database may need no sampling)
    model = load_model(cfg.model_name_or_path, adapter=cfg.adapter) if new_file and not new_file.exists() else None
    store = init_db(cfg.db)
    policy = policy_identity(cfg.model_name_or_path, cfg.adapter)
    settings = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")}
    settings["dataset_name"] = cfg.dataset_name
    need = [max(0, cfg.num_candidates - have) for have in _existing_counts(store, prompts, policy)]
    sampled = new_responses = new_comparisons = 0

    def keep(i: int, texts: list[str]) -> None:
        nonlocal sampled, new_responses, new_comparisons
        n_resp, n_comp = add_candidates(store, prompts[i], texts, policy=policy, settings=settings, mode=cfg.mode,
                                        overlap=cfg.overlap, compare=not select)  # fmt: skip
        sampled, new_responses, new_comparisons = sampled + len(texts), new_responses + n_resp, new_comparisons + n_comp

    todo = [i for i, n in enumerate(need) if n]
    if todo:
        from rlhf.generation import generate_responses

        if model is None:
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
    model = None  # freed before a reward model is loaded
    selected: dict = {}
    if select:
        selected = add_selected_comparisons(store, prompts, policy, cfg)
        new_comparisons += selected["selected"]
    else:
        for i, n in enumerate(need):
            if not n:
                keep(i, [])  # comparisons over stored responses (e.g. the other mode)
    gold = import_gold(store, cfg.gold_file, gold_rows) if cfg.gold_file else 0
    with store.write() as s:
        set_setting(s, "gold_rate", cfg.gold_rate)
    total = candidate_pool(store, prompts, policy, cfg.mode)[1]  # this run's and earlier runs' (e.g. interrupted)
    store.close()
    summary = {
        "prompts": len(prompts),
        "responses_sampled": sampled,
        "new_responses": new_responses,
        "new_comparisons": new_comparisons,
        "comparisons": total,
        "new_gold": gold,
        "policy": policy,
        **({"selection": cfg.selection, **selected} if select else {}),
    }
    print(
        f"{len(prompts)} prompts: {summary['responses_sampled']} responses sampled, {new_responses} new responses, "
        f"{new_comparisons} new comparisons, {gold} new gold items -> {shown_db(cfg.db)}"
    )
    if select:
        print(f"selection {cfg.selection}: {selected['selected']} comparisons created of "
              f"{selected['candidate_comparisons']} possible ({selected['already_selected']} already there; "
              f"label_budget {cfg.label_budget})")  # fmt: skip
    return summary
