"""Recording a labeler's answer: pairwise choice or K-wise ranking, strength, rationale, edit.

The assignment token doubles as the idempotency key (``votes.idempotency_key``
is unique): the same submission sent twice is stored once, and the second
call is reported as a duplicate instead of an error. A vote on an assignment
that expired (abandoned past ``assignment_ttl``) is still taken, once, if the
comparison has a free overlap slot; otherwise it is refused with
:class:`TaskExpired`; a vote on one skipped or re-queued since it was shown
(e.g. skipped in another tab) is refused with :class:`TaskClosed`: only a
``done`` assignment is a duplicate.
"""

from __future__ import annotations

from typing import Optional

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_ui.assign import lock_labeler, take_slot
from feedback_ui.candidates import add_response
from feedback_ui.store import Assignment, Comparison, Response, Vote, has_nul, utcnow
from rlhf.errors import UserError

PAIR_CHOICES = ("A", "B", "tie", "both_bad")
STRENGTHS = ("slightly", "much")


class VoteError(UserError):
    """A submission that cannot be recorded (unknown task, bad choice, bad ranking)."""


class TaskClosed(VoteError):
    """A vote on a task that is no longer the labeler's: skipped (in another window) or re-queued since it was
    shown. Not saved; the app answers with the next task and this message."""


class TaskExpired(TaskClosed):
    """A late vote on an expired assignment whose comparison went to other labelers meanwhile."""


EXPIRED_MESSAGE = ("not saved: this task was left open too long without an answer and has gone to other labelers "
                   "since; here is your next task")  # fmt: skip
CLOSED_MESSAGES = {
    "skipped": ("not saved: you skipped this task (in another window) before this answer arrived; "
                "here is your next task"),
    "requeued": "not saved: your project admin put this task back in the pool; here is your next task",
}


def normalize_strength(strength: Optional[str]) -> Optional[str]:
    """'' / None -> None; 'slightly better' -> 'slightly'; 'much better' -> 'much'."""
    if not strength:
        return None
    word = strength.strip().lower().split()[0]
    if word not in STRENGTHS:
        raise VoteError(f"strength must be one of {', '.join(STRENGTHS)} (or empty), got {strength!r}")
    return word


def _ranking_from_choice(order: list[int], choice: str) -> tuple[str, list[int], Optional[int]]:
    """(outcome, ranking best first, picked display slot) for a pairwise choice on displayed ``order``."""
    if choice == "A":
        return "ranked", [order[0], order[1]], 0
    if choice == "B":
        return "ranked", [order[1], order[0]], 1
    if choice in ("tie", "both_bad"):
        return choice, list(order), None
    raise VoteError(f"choice must be one of {', '.join(PAIR_CHOICES)}, got {choice!r}")


def _ranking_from_order(order: list[int], positions: list[int]) -> tuple[str, list[int], int]:
    """``positions`` lists display slots best first (a permutation of 0..K-1)."""
    if sorted(positions) != list(range(len(order))):
        raise VoteError(f"a ranking must order all {len(order)} responses exactly once, got {positions}")
    return "ranked", [order[i] for i in positions], positions[0]


def record_vote(
    session: Session,
    user_id: int,
    token: str,
    *,
    choice: Optional[str] = None,
    positions: Optional[list[int]] = None,
    strength: Optional[str] = None,
    rationale: Optional[str] = None,
    edit: Optional[str] = None,
) -> Optional[Vote]:
    """Store the vote for the labeler's assignment ``token``; None when it was already answered (``done``).

    Pair tasks take ``choice`` (A, B, tie, both_bad); ranking tasks take
    ``positions``. An ``edit`` (allowed with a decisive answer) is stored as a
    new response written by the labeler, ranked above the chosen one.
    Call inside ``Store.write()``; the caller's commit is the acknowledgement.
    """
    if "\x00" in token:  # no task has such a token (and PostgreSQL cannot compare it)
        raise VoteError("unknown task for this user")
    if has_nul([rationale, edit]):
        raise VoteError("the rationale or the edit holds a NUL character, which cannot be stored: remove it")
    lock_labeler(session, user_id)  # before the assignment row: the order next_task and skip_task use
    a = session.scalar(
        sa.select(Assignment).where(Assignment.token == token, Assignment.user_id == user_id).with_for_update()
    )  # the row is locked: an expiry sweep cannot change it under this vote
    if a is None:
        raise VoteError("unknown task for this user")
    if a.status == "expired":
        if not a.is_gold and not take_slot(session, a.comparison_id):
            raise TaskExpired(EXPIRED_MESSAGE)
    elif a.status == "done":
        return None
    elif a.status != "open":
        raise TaskClosed(CLOSED_MESSAGES.get(a.status, f"not saved: this task is {a.status}; here is your next task"))
    comparison = session.get(Comparison, a.comparison_id)
    if comparison.kind == "pair":
        if choice is None:
            raise VoteError("this task needs a choice: A, B, tie or both_bad")
        outcome, ranking, picked = _ranking_from_choice(a.order, choice)
    else:
        if positions is None:
            raise VoteError("this task needs a ranking of all responses")
        outcome, ranking, picked = _ranking_from_order(a.order, positions)
    strength = normalize_strength(strength)
    if strength and (outcome != "ranked" or comparison.kind != "pair"):
        raise VoteError("a strength goes with 'A is better' or 'B is better'")
    edited_id = None
    if edit and edit.strip():
        if outcome != "ranked":
            raise VoteError("an edit improves the better answer: choose A or B (or rank), or clear the edit")
        best = session.get(Response, ranking[0])
        if edit.strip() != best.text.strip():
            edited = add_response(
                session, comparison.prompt_id, edit.strip(), source="edit", author_id=user_id, parent_id=best.id
            )
            edited_id = edited.id if edited.id not in ranking else None
    now = utcnow()
    vote = Vote(
        assignment_id=a.id,
        comparison_id=comparison.id,
        user_id=user_id,
        idempotency_key=token,
        outcome=outcome,
        ranking=ranking,
        picked_position=picked,
        strength=strength,
        rationale=(rationale or "").strip() or None,
        edited_response_id=edited_id,
        seconds=max(0.0, (now - a.shown_at).total_seconds()),
        created_at=now,
    )
    a.status, a.finished_at = "done", now
    session.add(vote)
    session.flush()
    return vote
