"""Progress, per-labeler numbers and agreement, read from the database.

A vote's nominal label (for agreement) is ``tie`` / ``both_bad``, or the
position of the response it put first in the comparison's canonical order
(``best:0`` = the first stored response, whatever side it was shown on), so
categories mean the same on every item. Agreement uses regular comparisons with at least
two votes; gold items are scored against their known answer instead.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from itertools import combinations
from typing import Optional

import sqlalchemy as sa

from feedback_ui.agreement import cohen_kappa, krippendorff_alpha_nominal, percent_agreement
from feedback_ui.store import Assignment, Comparison, Prompt, Response, Store, User, Vote


def vote_label(outcome: str, ranking: list[int], response_ids: list[int]) -> str:
    return outcome if outcome != "ranked" else f"best:{response_ids.index(ranking[0])}"


def _round(x: Optional[float], nd: int = 3) -> Optional[float]:
    return None if x is None else round(x, nd)


def _counts(s) -> dict:
    def count(model, *where):
        return s.scalar(sa.select(sa.func.count()).select_from(model).where(*where)) or 0

    status = dict(s.execute(sa.select(Assignment.status, sa.func.count()).group_by(Assignment.status)).all())
    complete = s.scalar(
        sa.select(sa.func.count()).select_from(
            sa.select(Vote.comparison_id)
            .join(Comparison, Comparison.id == Vote.comparison_id)
            .where(~Comparison.is_gold)
            .group_by(Vote.comparison_id, Comparison.overlap)
            .having(sa.func.count() >= Comparison.overlap)
            .subquery()
        )
    )
    return {
        "users": count(User),
        "prompts": count(Prompt),
        "responses": count(Response),
        "comparisons": count(Comparison, ~Comparison.is_gold),
        "comparisons_complete": complete or 0,
        "gold_items": count(Comparison, Comparison.is_gold),
        "votes": count(Vote),
        "open": status.get("open", 0),
        "skipped": status.get("skipped", 0),
    }


def _agreement(labels: dict[int, dict[str, str]]) -> tuple[dict, dict[str, Optional[float]]]:
    """Overall agreement and each labeler's pairwise agreement with the others, from item -> {labeler: label}."""
    units = [list(by_user.values()) for by_user in labels.values() if len(by_user) >= 2]
    users = sorted({u for by_user in labels.values() for u in by_user})
    pairwise = []
    for a, b in combinations(users, 2):
        shared = [i for i, by_user in labels.items() if a in by_user and b in by_user]
        if shared:
            kappa = cohen_kappa([labels[i][a] for i in shared], [labels[i][b] for i in shared])
            pairwise.append({"labelers": [a, b], "items": len(shared), "cohen_kappa": _round(kappa)})
    per_user: dict[str, Optional[float]] = {}
    for u in users:
        hits = total = 0
        for by_user in labels.values():
            if u in by_user:
                others = [lab for v, lab in by_user.items() if v != u]
                hits += sum(lab == by_user[u] for lab in others)
                total += len(others)
        per_user[u] = _round(hits / total) if total else None
    kappas = [p["cohen_kappa"] for p in pairwise if p["cohen_kappa"] is not None]
    overall = {
        "overlapping_items": len(units),
        "percent_agreement": _round(percent_agreement(units)),
        "cohen_kappa": pairwise[0]["cohen_kappa"] if len(users) == 2 and pairwise else None,
        "mean_pairwise_kappa": _round(statistics.mean(kappas)) if kappas else None,
        "krippendorff_alpha": _round(krippendorff_alpha_nominal(units)),
        "pairwise": pairwise,
    }
    return overall, per_user


def collect_stats(store: Store) -> dict:
    """Everything ``rlhf label stats`` and the admin view show, as plain JSON-able data."""
    with store.read() as s:
        counts = _counts(s)
        users = s.execute(sa.select(User.id, User.name, User.role).order_by(User.id)).all()
        votes = s.execute(
            sa.select(
                Vote.user_id, Vote.comparison_id, Vote.outcome, Vote.ranking, Vote.picked_position,
                Vote.seconds, Comparison.kind, Comparison.response_ids, Comparison.is_gold, Comparison.gold_ranking,
            ).join(Comparison, Comparison.id == Vote.comparison_id)
        ).all()  # fmt: skip
        status = s.execute(
            sa.select(Assignment.user_id, Assignment.status, sa.func.count()).group_by(
                Assignment.user_id, Assignment.status
            )
        ).all()
    names = {uid: name for uid, name, _ in users}
    per_status: dict[int, dict[str, int]] = defaultdict(dict)
    for uid, st, n in status:
        per_status[uid][st] = n
    labels: dict[int, dict[str, str]] = defaultdict(dict)
    mine: dict[int, list] = defaultdict(list)
    for v in votes:
        mine[v.user_id].append(v)
        if not v.is_gold:
            labels[v.comparison_id][names[v.user_id]] = vote_label(v.outcome, v.ranking, v.response_ids)
    overall, agree_per_user = _agreement(labels)
    labelers = []
    for uid, name, role in users:
        vs = mine[uid]
        decisive = [v for v in vs if v.kind == "pair" and v.picked_position is not None]
        gold = [v for v in vs if v.is_gold]
        gold_hits = sum(v.outcome == "ranked" and v.ranking[0] == v.gold_ranking[0] for v in gold)
        labelers.append(
            {
                "name": name,
                "role": role,
                "done": len(vs),
                "skipped": per_status[uid].get("skipped", 0),
                "open": per_status[uid].get("open", 0),
                "median_seconds": _round(statistics.median(v.seconds for v in vs), 2) if vs else None,
                "side_a_rate": _round(sum(v.picked_position == 0 for v in decisive) / len(decisive))
                if decisive
                else None,
                "gold_items": len(gold),
                "gold_accuracy": _round(gold_hits / len(gold)) if gold else None,
                "agreement": agree_per_user.get(name),
            }
        )
    return {"counts": counts, "labelers": labelers, "agreement": overall}


LABELER_COLUMNS = [
    ("name", "labeler"), ("role", "role"), ("done", "done"), ("skipped", "skipped"),
    ("median_seconds", "median s/item"), ("side_a_rate", "picked A"), ("gold_items", "gold"),
    ("gold_accuracy", "gold acc."), ("agreement", "agreement"),
]  # fmt: skip


def labeler_table(stats: dict) -> list[list]:
    """Rows for a table of labelers in ``LABELER_COLUMNS`` order (None shown as '-')."""
    return [["-" if u[k] is None else u[k] for k, _ in LABELER_COLUMNS] for u in stats["labelers"]]


def format_stats(stats: dict) -> str:
    """Plain-text report for the terminal."""
    c, a = stats["counts"], stats["agreement"]
    lines = [
        f"comparisons: {c['comparisons']} ({c['comparisons_complete']} complete), gold items: {c['gold_items']}, "
        f"prompts: {c['prompts']}, responses: {c['responses']}",
        f"votes: {c['votes']}, open: {c['open']}, skipped: {c['skipped']}, users: {c['users']}",
        f"agreement on {a['overlapping_items']} overlapping items: percent {a['percent_agreement']}, "
        f"Cohen's kappa {a['cohen_kappa']}, mean pairwise kappa {a['mean_pairwise_kappa']}, "
        f"Krippendorff's alpha {a['krippendorff_alpha']}",
        "",
    ]
    header = [title for _, title in LABELER_COLUMNS]
    rows = [header] + [[str(x) for x in r] for r in labeler_table(stats)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
