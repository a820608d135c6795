"""Small labeling projects for tests and benchmarks (no model needed)."""

from __future__ import annotations

from feedback_ui.auth import add_user
from feedback_ui.candidates import add_candidates, add_comparison, add_response, get_or_add_prompt
from feedback_ui.store import Store, init_db, set_setting

PASSWORD = "correct horse battery"
HOSTILE = ['<script>window.__pwned=1</script> still text', '<img src=x onerror="window.__pwned=1"> also text']


def make_project(
    db: str,
    users: dict[str, str] | None = None,
    *,
    n_pairs: int = 10,
    n_rank: int = 0,
    k_rank: int = 3,
    overlap: int = 1,
    n_gold: int = 0,
    gold_rate: float = 0.0,
    hostile: bool = False,
    password: str = PASSWORD,
) -> Store:
    """A database with ``users`` (name -> role, all with ``password``), ``n_pairs`` pair comparisons,
    ``n_rank`` K-wise comparisons and ``n_gold`` gold pairs (chosen = 'good answer N')."""
    store = init_db(db)
    for name, role in (users or {}).items():
        add_user(store, name, password, role)
    for i in range(n_pairs):
        hostile_item = hostile and i == 0
        responses = HOSTILE if hostile_item else [f"answer {i}.a", f"answer {i}.b"]
        prompt = f"pair prompt {i}" + (" <b>not bold</b><script>window.__pwned=2</script>" if hostile_item else "")
        add_candidates(store, prompt, responses, policy="fixture", overlap=overlap)
    for i in range(n_rank):
        responses = [f"ranked answer {i}.{j}" for j in range(k_rank)]
        add_candidates(store, f"rank prompt {i}", responses, policy="fixture", mode="ranking", overlap=overlap)
    with store.write() as s:
        for i in range(n_gold):
            p = get_or_add_prompt(s, f"gold prompt {i}")
            good = add_response(s, p.id, f"good answer {i}", source="gold")
            bad = add_response(s, p.id, f"bad answer {i}", source="gold")
            add_comparison(s, p.id, [good.id, bad.id], gold_ranking=[good.id, bad.id])
        set_setting(s, "gold_rate", gold_rate)
    return store
