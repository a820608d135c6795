"""Progress, per-labeler numbers and agreement, read from the database.

A vote's nominal label (for agreement) is ``tie`` / ``both_bad``, or the
position of the response it put first in the comparison's canonical order
(``best:0`` = the first stored response, whatever side it was shown on), so
categories mean the same on every item. Agreement uses regular comparisons with at least
two votes; gold items are scored against their known answer instead. Votes voided by a
re-queue (:mod:`feedback_ui.requeue`) count nowhere but in ``voided``.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from datetime import datetime, timedelta
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
            .where(~Comparison.is_gold, Vote.counted())
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
        "votes": count(Vote, Vote.counted()),
        "voided": count(Vote, ~Vote.counted()),
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
        "cohen_kappa": pairwise[0]["cohen_kappa"] if len(pairwise) == 1 else None,  # one pair shares items
        "mean_pairwise_kappa": _round(statistics.mean(kappas)) if kappas else None,
        "krippendorff_alpha": _round(krippendorff_alpha_nominal(units)),
        "pairwise": pairwise,
    }
    return overall, per_user


def collect_stats(store: Store) -> dict:
    """Everything ``rlhf label stats`` and the admin view show, as plain JSON-able data."""
    with store.read() as s:
        counts = _counts(s)
        users = s.execute(sa.select(User.id, User.name, User.role, User.disabled_at).order_by(User.id)).all()
        votes = s.execute(
            sa.select(
                Vote.user_id, Vote.comparison_id, Vote.outcome, Vote.ranking, Vote.picked_position,
                Vote.seconds, Vote.created_at, Comparison.kind, Comparison.response_ids, Comparison.is_gold,
                Comparison.gold_ranking,
            ).join(Comparison, Comparison.id == Vote.comparison_id).where(Vote.counted())
        ).all()  # fmt: skip
        voided = dict(s.execute(
            sa.select(Vote.user_id, sa.func.count()).where(~Vote.counted()).group_by(Vote.user_id)
        ).all())  # fmt: skip
        status = s.execute(
            sa.select(Assignment.user_id, Assignment.status, sa.func.count()).group_by(
                Assignment.user_id, Assignment.status
            )
        ).all()
    names = {uid: name for uid, name, *_ in users}
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
    for uid, name, role, disabled_at in users:
        vs = mine[uid]
        decisive = [v for v in vs if v.kind == "pair" and v.picked_position is not None]
        gold = [v for v in vs if v.is_gold]
        gold_hits = sum(v.outcome == "ranked" and v.ranking[0] == v.gold_ranking[0] for v in gold)
        labelers.append(
            {
                "name": name,
                "role": role,
                "disabled": disabled_at is not None,
                "done": len(vs),
                "voided": voided.get(uid, 0),
                "decisive": len(decisive),
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
    for u in labelers:
        u["flags"] = labeler_flags(u)
    for pair in overall["pairwise"]:
        pair["flags"] = pair_flags(pair)
    return {"counts": counts, "labelers": labelers, "agreement": overall,
            "timeline": votes_timeline([v.created_at for v in votes])}  # fmt: skip


# out-of-range flags (a labeler or pair worth a look; small samples are never flagged)

SIDE_A_RANGE = (0.3, 0.7)
"""A labeler picking the response shown as A outside this share of decisive pair votes has a side bias."""
MIN_DECISIVE = 10
GOLD_MIN_ACCURACY = 0.7
MIN_GOLD = 3
PAIR_MIN_KAPPA = 0.2
MIN_SHARED = 5


def labeler_flags(u: dict) -> list[str]:
    """Short warnings for one labeler's row of :func:`collect_stats` (side bias, gold accuracy)."""
    flags = []
    low, high = SIDE_A_RANGE
    if u["side_a_rate"] is not None and u["decisive"] >= MIN_DECISIVE and not low <= u["side_a_rate"] <= high:
        flags.append(f"side bias: picked A in {u['side_a_rate']:.0%} of {u['decisive']} decisive votes")
    if u["gold_accuracy"] is not None and u["gold_items"] >= MIN_GOLD and u["gold_accuracy"] < GOLD_MIN_ACCURACY:
        flags.append(f"gold accuracy {u['gold_accuracy']:.0%} on {u['gold_items']} gold items")
    return flags


def pair_flags(pair: dict) -> list[str]:
    """A warning when two labelers agree little beyond chance on enough shared items."""
    kappa = pair["cohen_kappa"]
    if kappa is not None and pair["items"] >= MIN_SHARED and kappa < PAIR_MIN_KAPPA:
        return [f"low agreement: kappa {kappa:.2f} on {pair['items']} shared items"]
    return []


BUCKETS_S = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # the first that gives at most MAX_BUCKETS
MAX_BUCKETS = 60
EPOCH = datetime(1970, 1, 1)


def votes_timeline(times: list[datetime]) -> list[dict]:
    """Votes per time bucket: ``[{"time": ISO start (UTC), "votes": n, "total": cumulative}]``, oldest first.

    The bucket width is the smallest of ``BUCKETS_S`` giving at most ``MAX_BUCKETS`` buckets; empty
    buckets inside the span are kept (a flat line, not a jump)."""
    if not times:
        return []
    seconds = [(t - EPOCH).total_seconds() for t in times]  # naive UTC, as stored

    def buckets(w):  # counted from the bucket boundary before the first vote
        return int((max(seconds) - int(min(seconds) // w) * w) // w) + 1

    width = next((w for w in BUCKETS_S if buckets(w) <= MAX_BUCKETS), BUCKETS_S[-1])
    origin = int(min(seconds) // width) * width
    per = Counter(int((x - origin) // width) for x in seconds)
    total, rows = 0, []
    for i in range(max(per) + 1):
        total += per.get(i, 0)
        stamp = (EPOCH + timedelta(seconds=origin + i * width)).isoformat(timespec="minutes")
        rows.append({"time": stamp, "votes": per.get(i, 0), "total": total})
    return rows


LABELER_COLUMNS = [
    ("name", "labeler"), ("role", "role"), ("done", "done"), ("skipped", "skipped"),
    ("median_seconds", "median s/item"), ("side_a_rate", "picked A"), ("gold_items", "gold"),
    ("gold_accuracy", "gold acc."), ("agreement", "agreement"),
]  # fmt: skip


def labeler_table(stats: dict) -> list[list]:
    """Rows for a table of labelers in ``LABELER_COLUMNS`` order (None shown as '-')."""
    return [["-" if u[k] is None else u[k] for k, _ in LABELER_COLUMNS] for u in stats["labelers"]]


NOT_ENOUGH = "n/a (too few overlapping votes)"


def shown(x, missing: str = "n/a") -> str:
    """A number for people: None becomes ``missing``, never the text 'None'."""
    return missing if x is None else str(x)


def agreement_text(a: dict) -> str:
    """One line on agreement, every missing number said in words."""
    if not a["overlapping_items"]:
        return "agreement (percent, Cohen's kappa, Krippendorff's alpha): n/a (no item has two votes yet)"
    kappa = a["cohen_kappa"]
    kappa_text = (shown(kappa, NOT_ENOUGH) if len(a["pairwise"]) <= 1
                  else f"n/a for {len(a['pairwise'])} labeler pairs (see the pairs)")  # fmt: skip
    return (f"agreement on {a['overlapping_items']} overlapping items: percent {shown(a['percent_agreement'], NOT_ENOUGH)}, "
            f"Cohen's kappa {kappa_text}, mean pairwise kappa {shown(a['mean_pairwise_kappa'], NOT_ENOUGH)}, "
            f"Krippendorff's alpha {shown(a['krippendorff_alpha'], NOT_ENOUGH)}")  # fmt: skip


def format_stats(stats: dict) -> str:
    """Plain-text report for the terminal."""
    c, a = stats["counts"], stats["agreement"]
    lines = [
        f"comparisons: {c['comparisons']} ({c['comparisons_complete']} complete), gold items: {c['gold_items']}, "
        f"prompts: {c['prompts']}, responses: {c['responses']}",
        f"votes: {c['votes']} counted, {c['voided']} voided, open: {c['open']}, skipped: {c['skipped']}, "
        f"users: {c['users']}",
        agreement_text(a),
        "",
    ]
    header = [title for _, title in LABELER_COLUMNS]
    rows = [header] + [[str(x) for x in r] for r in labeler_table(stats)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    flagged = [f"! {u['name']}: {flag}" for u in stats["labelers"] for flag in u["flags"]]
    flagged += [f"! {' & '.join(p['labelers'])}: {flag}" for p in a["pairwise"] for flag in p["flags"]]
    return "\n".join(lines + ([""] + flagged if flagged else []))
