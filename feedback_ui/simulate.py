"""Simulated labelers: scripted accounts that vote through the app's real HTTP API.

They exist for the demo pipeline and for load tests, and are named as such
(``sim-labeler-N``). Each one logs in like a person would (``gradio_client``
with username/password), asks for its next task, and answers by a transparent
rule: the response with the higher ``rule(prompt, response)`` score wins; equal
scores, or a difference below ``min_gap``, are a tie; with probability ``noise``
the vote is flipped (to model imperfect people). Ranking tasks are ordered by the
score; with probability ``noise`` two neighbouring places of the order are swapped.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

RuleScore = Callable[[str, str], float]


def rule_choice(prompt: str, responses: list[str], rule: RuleScore, min_gap: float, rng: random.Random,
                noise: float) -> str:  # fmt: skip
    """'A', 'B' or 'tie' for a pair shown as (A, B)."""
    a, b = rule(prompt, responses[0]), rule(prompt, responses[1])
    if a == b or abs(a - b) < min_gap:  # equal scores prefer neither side (never the one shown second)
        return "tie"
    choice = "A" if a > b else "B"
    if rng.random() < noise:
        choice = "B" if choice == "A" else "A"
    return choice


def rule_ranking(prompt: str, responses: list[str], rule: RuleScore, rng: random.Random | None = None,
                 noise: float = 0.0) -> list[int]:  # fmt: skip
    """Display positions best first (stable for equal scores); with probability ``noise`` (drawn from ``rng``) two
    neighbouring places are swapped."""
    scores = [rule(prompt, r) for r in responses]
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    if rng is not None and rng.random() < noise:
        i = rng.randrange(len(order) - 1)
        order[i], order[i + 1] = order[i + 1], order[i]
    return order


def label_until_done(url: str, name: str, password: str, rule: RuleScore, *, min_gap: float = 0.0,
                     noise: float = 0.0, seed: int = 0, max_votes: int | None = None) -> int:  # fmt: skip
    """Log in as ``name`` and vote on every task in its queue; returns the number of votes cast."""
    from gradio_client import Client

    # ssl_verify only matters for https; off for plain http it spares a TLS context (~60 ms CPU) per request
    # a login hashes the password (scrypt, about 0.3 s on an idle core): on a loaded machine httpx's 5 s
    # default timeout is too short for it
    client = Client(url, auth=(name, password), verbose=False, ssl_verify=not url.startswith("http://"),
                    httpx_kwargs={"timeout": 60})
    rng = random.Random(f"{seed}-{name}")
    task = client.predict(api_name="/next_task")
    votes = 0
    while task.get("token") and (max_votes is None or votes < max_votes):
        if task["kind"] == "rank":
            positions = rule_ranking(task["prompt"], task["responses"], rule, rng, noise)
            task = client.predict(task["token"], positions, api_name="/rank")
        else:
            choice = rule_choice(task["prompt"], task["responses"], rule, min_gap, rng, noise)
            task = client.predict(task["token"], choice, api_name="/vote")
        votes += 1
    client.close()
    return votes


def run_simulated_labelers(url: str, accounts: list[tuple[str, str]], rule: RuleScore, **kwargs) -> dict[str, int]:
    """All ``accounts`` label concurrently until their queues are empty; votes per account."""
    with ThreadPoolExecutor(max_workers=max(1, len(accounts))) as pool:
        futures = {name: pool.submit(label_until_done, url, name, pw, rule, **kwargs) for name, pw in accounts}
        return {name: f.result() for name, f in futures.items()}
