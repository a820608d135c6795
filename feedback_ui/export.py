"""Votes in the database -> preference JSONL (``prompt``, ``chosen``, ``rejected``, ``margin`` + provenance).

The rows are TRL's explicit-prompt preference format (string columns), so
``rlhf reward`` and TRL's RewardTrainer read them as they are; the extra
columns (annotator, comparison_id, ...) are provenance. Gold items and votes
voided by a re-queue (:mod:`feedback_ui.requeue`) are never exported.

A kept tie or both-bad (``--keep``) prefers neither response, and the trainers
read every row as "chosen is better" (they do not look at ``outcome``): it is
written as two rows, once each way round, with margin 0. To the Bradley-Terry
loss that is half a win for each side: it pulls the two scores together and
favours neither (one row would favour whichever response was stored first).

A prompt that is more than one user turn (a system message, an earlier exchange) is written as its messages, and then
every row of the file in TRL's conversational form (each answer an assistant turn), so that the reward model reads
the context the policy answered, not the flattened text labelers read; single-turn prompts stay strings.

Without ``test_fraction`` no held-out file is written, and one left by an
earlier export to the same ``out`` is removed: its prompts may be in the new
training rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa

from feedback_ui.pairs import Judgement, PrefPair, split_by_prompt, strength_to_margin
from feedback_ui.pairs import aggregate as judgements_to_pairs
from feedback_ui.store import Comparison, Prompt, Response, Store, User, Vote
from rlhf.errors import UserError
from rlhf.outputs import write_jsonl


def held_out_path(out: str | os.PathLike) -> Path:
    """Sibling file for the held-out prompts: ``prefs.jsonl`` -> ``prefs.test.jsonl``."""
    p = Path(out)
    return p.with_name(f"{p.stem}.test{p.suffix or '.jsonl'}")


def load_judgements(store: Store, margin_slightly: float = 1.0, margin_much: float = 3.0) -> dict[int, dict]:
    """Per non-gold comparison: its prompt text and the list of :class:`Judgement` (one per vote)."""
    with store.read() as s:
        rows = s.execute(
            sa.select(Vote, User.name, Comparison.prompt_id, Prompt.text, Prompt.messages)
            .join(User, User.id == Vote.user_id)
            .join(Comparison, Comparison.id == Vote.comparison_id)
            .join(Prompt, Prompt.id == Comparison.prompt_id)
            .where(~Comparison.is_gold, Vote.counted())
            .order_by(Vote.comparison_id, Vote.id)
        ).all()
    items: dict[int, dict] = {}
    for vote, name, prompt_id, prompt_text, messages in rows:
        item = items.setdefault(vote.comparison_id, {"prompt_id": prompt_id, "prompt": prompt_text,
                                                     "messages": messages, "judgements": []})  # fmt: skip
        item["judgements"].append(
            Judgement(
                annotator=name,
                outcome=vote.outcome,
                ranking=tuple(vote.ranking),
                margin=strength_to_margin(vote.strength, margin_slightly, margin_much),
                edit=vote.edited_response_id,
                created_at=vote.created_at.isoformat(timespec="seconds") + "Z",
            )
        )
    return items


def _texts(store: Store, ids: Iterable[int]) -> dict[int, str]:
    ids = sorted(set(ids))
    out: dict[int, str] = {}
    with store.read() as s:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            out.update(s.execute(sa.select(Response.id, Response.text).where(Response.id.in_(chunk))).all())
    return out


def _rows(item: dict, comparison_id: int, p: PrefPair, texts: dict[int, str]) -> list[dict]:
    """One row per decisive pair; a tie or both-bad as two rows, once each way round (see the module docstring)."""
    row = _row(item, comparison_id, p, texts)
    if p.outcome == "ranked":
        return [row]
    swapped = {"chosen": row["rejected"], "rejected": row["chosen"], "chosen_id": p.rejected, "rejected_id": p.chosen}
    return [row, {**row, **swapped}]


def _one_user_turn(messages) -> bool:
    return isinstance(messages, list) and len(messages) == 1 and messages[0].get("role") == "user"


def _conversational(row: dict, messages: list) -> dict:
    """A row in TRL's conversational form: the prompt's messages as stored, each answer as one assistant turn."""
    return {**row, "prompt": messages, "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}  # fmt: skip


def _row(item: dict, comparison_id: int, p: PrefPair, texts: dict[int, str]) -> dict:
    return {
        "prompt": item["prompt"],
        "chosen": texts[p.chosen],
        "rejected": texts[p.rejected],
        "margin": float(p.margin),
        "annotator": ",".join(p.annotators),
        "comparison_id": comparison_id,
        "prompt_id": item["prompt_id"],
        "chosen_id": p.chosen,
        "rejected_id": p.rejected,
        "outcome": p.outcome,
        "n_votes": len(item["judgements"]),
        "created_at": p.created_at,
    }


def export_preferences(
    store: Store,
    out: str,
    *,
    strategy: str = "all-pairs",
    aggregate: str = "majority",
    keep: Iterable[str] = (),
    test_fraction: float = 0.0,
    seed: int = 0,
    margin_slightly: float = 1.0,
    margin_much: float = 3.0,
) -> dict:
    """Write preference rows; returns counts. ``keep`` may add ``tie`` and/or ``both_bad`` rows (two each)."""
    keep = set(keep)
    if keep - {"tie", "both_bad"}:
        raise UserError(f"--keep takes tie and/or both_bad, got {', '.join(sorted(keep))}")
    if not 0 <= test_fraction < 1:
        raise UserError("--test_fraction must be in [0, 1)")
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise UserError(f"folder of output file {out_path} does not exist")
    items = load_judgements(store, margin_slightly, margin_much)
    pairs: list[tuple[int, PrefPair]] = []
    for cid, item in items.items():
        for p in judgements_to_pairs(item["judgements"], strategy, aggregate):
            if p.outcome == "ranked" or p.outcome in keep:
                pairs.append((cid, p))
    texts = _texts(store, [i for _, p in pairs for i in (p.chosen, p.rejected)])
    rows = [r for cid, p in pairs for r in _rows(items[cid], cid, p, texts)]
    held_out = split_by_prompt([r["prompt"] for r in rows], test_fraction, seed)  # by the text labelers read
    train = [r for r in rows if r["prompt"] not in held_out]
    test = [r for r in rows if r["prompt"] in held_out]
    if any(not _one_user_turn(items[cid]["messages"]) for cid, _ in pairs):
        train, test = ([_conversational(r, items[r["comparison_id"]]["messages"]) for r in part]
                       for part in (train, test))  # fmt: skip
    test_path = held_out_path(out_path)
    counts = {"comparisons": len(items), "rows": len(train), "out": str(out_path)}
    if test_path.is_file():  # before the new rows: an interrupted export leaves no old held-out file beside them
        test_path.unlink()
        if test_fraction == 0:
            counts["removed"] = str(test_path)
    write_jsonl(out_path, train)
    if test_fraction > 0:
        write_jsonl(test_path, test)
        counts.update(test_rows=len(test), test_out=str(test_path))
    return counts
