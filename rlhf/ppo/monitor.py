"""Over-optimisation monitor: held-out answers scored by the proxy reward model and a gold judge.

Every ``eval_steps`` PPO steps the policy answers a held-out prompt set greedily; the answers are scored
by the proxy (the reward PPO optimises) and, when given, a gold judge (a rule or another reward model).
Gao et al. (2023) plot both against sqrt(KL) to the reference: the proxy keeps rising while the gold
score peaks and falls once the policy exploits the proxy. The KL of a point is the mean sequence KL
(k1) of that step's training rollouts, measured on the policy's own samples.

``select_checkpoint`` picks the exported policy: the last one, or the one of the point with the highest
gold or held-out proxy score (:func:`best_point`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from rlhf.ppo.rollout import empty_responses, generate, join_responses
from rlhf.ppo.scorers import ScoreInput

SELECT_KEYS = {"best_gold": "gold", "best_proxy_heldout": "proxy"}


@dataclass
class MonitorPoint:
    step: int
    proxy: float             # mean proxy score (raw, as the scorer returns it) of the held-out answers
    gold: float | None       # mean gold score, None without a gold judge
    kl: float                # mean sequence KL (k1) of the step's rollouts
    length: float            # mean response tokens of the held-out answers
    empty: int = 0           # held-out answers with nothing but whitespace

    @property
    def sqrt_kl(self) -> float:
        return math.sqrt(max(self.kl, 0.0))

    def as_dict(self) -> dict:
        return {**asdict(self), "sqrt_kl": self.sqrt_kl}


def best_point(points: list[MonitorPoint], key: str) -> MonitorPoint | None:
    """The point with the highest ``key`` ("gold" or "proxy"); the earliest step among equals (less KL spent).
    None when no point has that score."""
    scored = [p for p in points if getattr(p, key) is not None]
    if not scored:
        return None
    return max(scored, key=lambda p: (getattr(p, key), -p.step))


class Monitor:
    """Scores greedy held-out answers of the actor's policy with ``proxy`` and ``gold`` (:class:`Scorer`\\ s)."""

    def __init__(self, prompts: list, proxy, gold=None, *, max_new_tokens: int, max_prompt_length: int, chunk: int):
        self.prompts, self.proxy, self.gold = prompts, proxy, gold
        self.generate_kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens}
        self.max_prompt_length, self.chunk = max_prompt_length, chunk
        self.points: list[MonitorPoint] = []

    @torch.no_grad()
    def evaluate(self, actor, tokenizer, step: int, kl: float) -> MonitorPoint:
        from rlhf.generation import decode_responses

        prompt_ids, prompt_mask, response_ids = generate(
            actor, tokenizer, self.prompts, generate_kwargs=self.generate_kwargs,
            max_prompt_length=self.max_prompt_length, chunk=self.chunk)
        input_ids, attention_mask, response_ids, mask, _ = join_responses(tokenizer, prompt_ids, prompt_mask,
                                                                          response_ids)
        responses = decode_responses(tokenizer, response_ids)
        batch = ScoreInput(self.prompts, responses, input_ids, attention_mask, response_ids, mask, prompt_ids.shape[1])
        proxy = float(self.proxy.score_batch(batch).float().mean())
        gold = float(self.gold.score_batch(batch).float().mean()) if self.gold is not None else None
        point = MonitorPoint(step, proxy, gold, float(kl), float(mask.sum(dim=1).float().mean()),
                             int(empty_responses(responses).sum()))
        self.points.append(point)
        return point

    def state_dict(self) -> list[dict]:
        return [asdict(p) for p in self.points]

    def load_state_dict(self, rows: list[dict]) -> None:
        self.points = [MonitorPoint(**row) for row in rows]

    def plot(self, path) -> None:
        """Proxy and gold score of the held-out answers against sqrt(KL) (one PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.points:
            return
        x = [p.sqrt_kl for p in self.points]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [p.proxy for p in self.points], "o-", label="proxy (reward model)")
        ax.set_xlabel("sqrt(KL to reference)  [sqrt nats]")
        ax.set_ylabel("proxy score")
        if any(p.gold is not None for p in self.points):
            gold_ax = ax.twinx()
            gold_ax.plot(x, [p.gold for p in self.points], "s--", color="tab:orange", label="gold")
            gold_ax.set_ylabel("gold score")
            fig.legend(loc="lower right")
        else:
            ax.legend(loc="lower right")
        for p in self.points:
            ax.annotate(str(p.step), (p.sqrt_kl, p.proxy), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_title("held-out answers: reward vs KL (step numbers)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
