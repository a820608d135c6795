"""``rlhf eval``: is the aligned policy better than its baseline, and how far did it move?

Both policies answer the same prompts; a reward model (and optionally a
transparent rule) scores every answer. Reported: win rate with a Wilson
confidence interval, mean rewards, the KL of the policy to the baseline on the
policy's own samples, response lengths; JSON + PNG plots.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from rlhf.data import load_prompts, prompt_text
from rlhf.errors import UserError
from rlhf.eval_config import EvalConfig  # noqa: F401 (re-exported: rlhf.evaluate.EvalConfig)
from rlhf.generation import (SamplingSettings, decode_responses, is_prompt_learning, response_log_dists,
                             response_mask, sample_batch)  # fmt: skip
from rlhf.models import ADAPTER_CONFIGS, adapter_base, load_model, load_tokenizer, pick_device, tokenizer_source
from rlhf.outputs import check_output_dir, write_json


# pure statistics


def win_rate(policy_scores: list[float], baseline_scores: list[float], z: float = 1.96) -> dict:
    """Paired win rate p = (wins + ties / 2) / n with a Wilson score interval.

    Wilson: centre = (p + z^2/2n) / (1 + z^2/n), half-width = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if len(policy_scores) != len(baseline_scores) or not policy_scores:
        raise ValueError("need two equally long, non-empty score lists")
    wins = sum(a > b for a, b in zip(policy_scores, baseline_scores))
    ties = sum(a == b for a, b in zip(policy_scores, baseline_scores))
    n = len(policy_scores)
    p = (wins + 0.5 * ties) / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval holds p exactly; at p = 0 or 1 rounding can put its end a hair inside (1 - 1e-16)
    return {"win_rate": p, "ci_low": min(p, max(0.0, centre - half)), "ci_high": max(p, min(1.0, centre + half)),
            "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# length control: is a win only a longer (or shorter) answer?


def word_count(text: str) -> int:
    """Length of a response in whitespace-separated words (``len(text.split())``), the unit of every length here."""
    return len(text.split())


def unchanged(policy_texts: list[str], baseline_texts: list[str]) -> int:
    """How many paired answers are the baseline's word for word (whitespace at the ends aside): prompts on which
    the policy did not move at all, whatever a judge says of them."""
    if len(policy_texts) != len(baseline_texts):
        raise ValueError(f"{len(policy_texts)} policy answers for {len(baseline_texts)} baseline answers")
    return sum(p.strip() == b.strip() for p, b in zip(policy_texts, baseline_texts))


def length_gap(len_a: int, len_b: int) -> float:
    """Relative length difference ``|a - b| / max(a, b)`` in [0, 1]; 0 when both are empty."""
    longer = max(len_a, len_b)
    return abs(len_a - len_b) / longer if longer else 0.0


def length_matched(pairs: list[tuple[int, int]], tolerance: float) -> list[int]:
    """Indices of the length pairs ``(len_a, len_b)`` with ``length_gap(len_a, len_b) < tolerance``."""
    return [i for i, (a, b) in enumerate(pairs) if length_gap(a, b) < tolerance]


def length_controlled(policy_texts: list[str], baseline_texts: list[str],
                      scores: dict[str, tuple[list[float], list[float]]], tolerance: float) -> dict:
    """Win rates restricted to the length-matched pairs, and the mean words of each side.

    ``scores`` maps a judge name to (policy scores, baseline scores), paired with the texts. Each judge
    gets ``win_rate`` of its matched pairs (Wilson interval and n included), or ``{"n": 0, "win_rate":
    None}`` when no pair is matched. Mean words are given over all pairs and over the matched ones
    (None when none is matched).
    """
    lengths = [(word_count(a), word_count(b)) for a, b in zip(policy_texts, baseline_texts, strict=True)]
    keep = length_matched(lengths, tolerance)
    out: dict = {
        "unit": "words",
        "tolerance": tolerance,
        "n_pairs": len(lengths),
        "n_matched": len(keep),
        "policy_mean_words": mean([a for a, _ in lengths]),
        "baseline_mean_words": mean([b for _, b in lengths]),
        "matched_policy_mean_words": mean([lengths[i][0] for i in keep]) if keep else None,
        "matched_baseline_mean_words": mean([lengths[i][1] for i in keep]) if keep else None,
    }
    for judge, (policy, baseline) in scores.items():
        if keep:
            out[judge] = win_rate([policy[i] for i in keep], [baseline[i] for i in keep])
        else:
            out[judge] = {"n": 0, "win_rate": None}
    return out


# model access


def policy_source(folder: str, base_override: str | None) -> tuple[str, str | None]:
    """(base model, adapter or None) for an adapter folder, a full model folder, or 'base'."""
    path = Path(folder)
    if folder == "base":
        if not base_override:
            raise UserError("baseline 'base' needs model_name_or_path")
        return base_override, None
    if any((path / name).is_file() for name in ADAPTER_CONFIGS):
        return base_override or adapter_base(folder), str(path)
    if (path / "config.json").is_file():
        return str(path), None
    raise UserError(f"{folder} is neither an adapter folder nor a model folder")


@torch.no_grad()
def sample_answers(model, tokenizer, prompts, settings: SamplingSettings, batch_size: int, seed: int):
    """Responses, and per batch the token ids :func:`kl_to` compares two models on."""
    torch.manual_seed(seed)
    batches, texts = [], []
    for start in range(0, len(prompts), batch_size):
        p_ids, p_mask, r_ids = sample_batch(model, tokenizer, prompts[start : start + batch_size], settings)
        texts.extend(decode_responses(tokenizer, r_ids))
        batches.append((p_ids, p_mask, r_ids, response_mask(tokenizer, r_ids)))
    return texts, batches


KL_CHUNK_ELEMENTS = 1 << 25  # rows x tokens x vocabulary held at once (128 MiB of float32 per distribution)


@torch.no_grad()
def kl_to(policy: Callable, reference: Callable, batches, temperature: float) -> tuple[list[float], list[float]]:
    """Per answer of the policy: (KL, log-ratio) to the reference, both summed over its tokens.

    ``policy`` / ``reference``: ``() -> context manager`` giving the model (the two may be one model switched, as in
    the alpha sweep). KL: sum_t KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t)), the exact KL of the two next-token
    distributions (at the sampling temperature) along the policy's own answer: for sampled answers an unbiased,
    low-variance estimate of the sequence KL, and defined for greedy answers too. Log-ratio: sum_t log pi(y_t) -
    log pi_ref(y_t) (the k1 estimate), a KL estimate only for untruncated sampling (not greedy, top_k or top_p).
    Rows are taken a few at a time, so memory stays bounded whatever the answers' length or the vocabulary (one at
    a time, without its left padding, for prompt and prefix tuning, whose position ids PEFT ignores).
    """
    kls, ratios = [], []
    with policy() as model:
        vocab, single = model.get_output_embeddings().weight.shape[0], is_prompt_learning(model)
    with reference() as model:
        single = single or is_prompt_learning(model)
    for p_ids, p_mask, r_ids, r_mask in batches:
        rows = 1 if single else max(1, KL_CHUNK_ELEMENTS // max(1, r_ids.shape[1] * vocab))
        for i in range(0, r_ids.shape[0], rows):
            part = (p_ids[i : i + rows], p_mask[i : i + rows], r_ids[i : i + rows], r_mask[i : i + rows])
            if single:
                real = part[1][0].bool()
                part = (part[0][:, real], part[1][:, real], part[2], part[3])
            with policy() as model:
                dists = response_log_dists(model, *part, temperature)
            with reference() as model:
                ref = response_log_dists(model, *part, temperature)
            per_token = (dists.exp() * (dists - ref)).sum(dim=-1)  # (rows, R)
            chosen = (dists - ref).gather(-1, part[2].unsqueeze(-1)).squeeze(-1)
            kls.extend((per_token * part[3]).sum(dim=1).tolist())
            ratios.extend((chosen * part[3]).sum(dim=1).tolist())
    return kls, ratios


def plot_results(result: dict, out_dir: Path, ppo_logs: str | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    judges = [k for k in ("reward_model", "rule") if k in result]
    fig, ax = plt.subplots(figsize=(4 + len(judges), 3.5))
    rates = [result[j]["win_rate"] for j in judges]
    errs = [[r - result[j]["ci_low"] for r, j in zip(rates, judges)], [result[j]["ci_high"] - r for r, j in zip(rates, judges)]]
    ax.bar(judges, rates, yerr=errs, capsize=6, color=["#4c72b0", "#55a868"][: len(judges)])
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate of policy vs baseline")
    ax.set_title("Win rate (95% Wilson CI)")
    fig.tight_layout()
    fig.savefig(out_dir / "win_rate.png", dpi=100)
    plt.close(fig)
    written.append(str(out_dir / "win_rate.png"))
    return written + plot_ppo_logs(out_dir, ppo_logs)


def plot_ppo_logs(out_dir: Path, ppo_logs: str | None) -> list[str]:
    """``ppo_curves.png`` from ``ppo_logs/metrics.jsonl`` when there is one: ``[its path]``, else ``[]``."""
    log_file = Path(ppo_logs) / "metrics.jsonl" if ppo_logs else None
    if not (log_file and log_file.is_file()):
        return []
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return [plot_training_curves(rows, out_dir / "ppo_curves.png")]


def plot_training_curves(rows: list[dict], path: Path) -> str:
    """Reward and KL curves from PPO's metrics.jsonl rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(pred):
        keys = sorted({k for r in rows for k in r if pred(k)})
        return {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}

    reward = series(lambda k: ("reward" in k or "score" in k) and "std" not in k and "coef" not in k)
    kl = series(lambda k: k.startswith("kl") or "/kl" in k or k.endswith("_kl"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, data, title in [(axes[0], reward, "reward"), (axes[1], kl, "KL to reference")]:
        for key, (xs, ys) in data.items():
            ax.plot(xs, ys, label=key)
        ax.set_xlabel("PPO step")
        ax.set_title(title)
        if data:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def load_rule(name: str) -> Callable[[str, str], float]:
    """A rule score function ``f(prompt, response) -> float`` from ``reward.rules``."""
    import reward.rules as rules  # wiring: the rule lives with the reward package

    fn = getattr(rules, name, None) or getattr(rules, f"{name}_score", None)
    if fn is None and name in getattr(rules, "RULES", {}):
        fn = rules.RULES[name]
    if not callable(fn):
        raise UserError(f"unknown rule '{name}' (see reward/rules.py)")
    return fn


def load_judges(cfg: EvalConfig) -> dict[str, Callable[[list, list[str]], list[float]]]:
    """The judges of ``cfg``: ``reward_model`` and/or ``rule``, each ``f(prompts, responses) -> scores``."""
    judges = {}
    if cfg.reward_model:
        from reward import RewardScorer  # wiring: scoring lives in the reward package

        judges["reward_model"] = RewardScorer.from_pretrained(cfg.reward_model).score
    if cfg.rule:
        rule = load_rule(cfg.rule)
        judges["rule"] = lambda prompts, texts: [rule(prompt_text(p), t) for p, t in zip(prompts, texts)]
    return judges


def compare(cfg: EvalConfig, texts: dict[str, list[str]], scores: dict[str, dict[str, list[float]]],
            kl: tuple[list[float], list[float]]) -> dict:  # fmt: skip
    """One policy against the baseline on paired answers: mean KL, mean words, a win rate per judge, length control.

    ``texts``: role ("policy", "baseline") -> responses; ``scores``: judge -> role -> scores, paired with
    them; ``kl``: per-response (KL, log-ratio) of the policy to the baseline on the policy's answers (:func:`kl_to`).
    """
    result: dict = {
        "kl_policy_to_baseline": mean(kl[0]),
        "logratio_policy_to_baseline": mean(kl[1]),
        "response_words": {r: mean([len(t.split()) for t in texts[r]]) for r in texts},
        "unchanged": unchanged(texts["policy"], texts["baseline"]),
    }
    for judge, by_role in scores.items():
        result[judge] = win_rate(by_role["policy"], by_role["baseline"])
        if judge == "rule":
            result[judge]["name"] = cfg.rule
        result[judge].update(policy_mean=mean(by_role["policy"]), baseline_mean=mean(by_role["baseline"]))
    judged = {judge: (by_role["policy"], by_role["baseline"]) for judge, by_role in scores.items()}
    result["length_controlled"] = length_controlled(texts["policy"], texts["baseline"], judged, cfg.length_tolerance)
    return result


def eval_setup(cfg: EvalConfig) -> tuple[dict, list, SamplingSettings]:
    """The header of eval.json, the prompts (each repeated ``samples_per_prompt`` times: comparison i pairs the
    i-th sample of both policies for the same prompt) and the sampling settings."""
    prompts = [p for p in load_prompts(cfg.dataset_name, cfg.max_prompts) for _ in range(cfg.samples_per_prompt)]
    header = {
        "n_prompts": len(prompts) // cfg.samples_per_prompt,
        "samples_per_prompt": cfg.samples_per_prompt,
        "do_sample": cfg.do_sample,
        "temperature": cfg.temperature if cfg.do_sample else None,
    }
    return header, prompts, SamplingSettings(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k)


def run_eval(cfg: EvalConfig) -> dict:
    if cfg.alpha_sweep:
        return run_alpha_sweep(cfg)
    check_output_dir(cfg.out_dir, "out_dir")  # a file there stops the run before any model loads
    result, prompts, settings = eval_setup(cfg)
    temperature = cfg.temperature if cfg.do_sample else 1.0
    device = pick_device()
    texts, batches, models = {}, {}, {}
    for role, folder in (("policy", cfg.policy), ("baseline", cfg.baseline)):
        base, adapter = policy_source(folder, cfg.model_name_or_path)
        tokenizer = load_tokenizer(tokenizer_source(base, adapter))
        models[role] = load_model(base, adapter, dtype=torch.float32, device=device)
        texts[role], batches[role] = sample_answers(models[role], tokenizer, prompts, settings, cfg.batch_size,
                                                    cfg.seed)  # fmt: skip
    kl = kl_to(partial(nullcontext, models["policy"]), partial(nullcontext, models["baseline"]), batches["policy"],
               temperature)  # fmt: skip
    del models
    judges = load_judges(cfg)
    scores = {j: {role: judge(prompts, texts[role]) for role in texts} for j, judge in judges.items()}
    result.update(compare(cfg, texts, scores, kl))
    plain = [prompt_text(p) for p in prompts]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot_results(result, out_dir, cfg.ppo_logs)
    result["samples"] = [
        {"prompt": plain[i], "policy": texts["policy"][i], "baseline": texts["baseline"][i]} for i in range(len(prompts))
    ]
    write_json(out_dir / "eval.json", result)
    print_summary(result, cfg.show_samples)
    return result


def run_alpha_sweep(cfg: EvalConfig) -> dict:
    """``rlhf eval --alpha_sweep``: theta(alpha) = (1 - alpha) theta_baseline + alpha theta_policy against the baseline.

    The baseline answers once; for each alpha the interpolation answers the same prompts with the same
    seed and is compared as :func:`run_eval` compares a policy (:func:`compare`). One base model serves
    every point (:class:`rlhf.alpha_sweep.SweepModel`). eval.json: the header, ``sweep`` (one entry per
    alpha, increasing: ``alpha`` + what ``compare`` reports, each judge's block flagged ``pareto``),
    ``plots`` and ``samples`` (each prompt's baseline answer and one answer per alpha).
    """
    import time

    from rlhf.alpha_sweep import SweepModel, pareto_front, plot_alpha_sweep, sweep_ends

    out_dir = check_output_dir(cfg.out_dir, "out_dir")
    ends = sweep_ends(cfg.policy, cfg.baseline, cfg.model_name_or_path)  # bad ends stop here, before any model loads
    result, prompts, settings = eval_setup(cfg)
    result.update(sweep_from=ends.start_kind, sweep_baseline=ends.baseline or ends.base, sweep_policy=cfg.policy)
    judges = load_judges(cfg)
    temperature = cfg.temperature if cfg.do_sample else 1.0
    tokenizer = load_tokenizer(tokenizer_source(ends.base, cfg.policy))
    sweep = SweepModel(ends, pick_device())
    started = time.perf_counter()
    with sweep.baseline() as model:
        baseline, _ = sample_answers(model, tokenizer, prompts, settings, cfg.batch_size, cfg.seed)
    baseline_scores = {j: judge(prompts, baseline) for j, judge in judges.items()}
    seconds = time.perf_counter() - started
    print(f"alpha sweep: the baseline answered {len(prompts)} prompts ({seconds:.1f} s)", file=sys.stderr)
    points, answers = [], {}
    for i, alpha in enumerate(cfg.alpha_sweep, start=1):
        started = time.perf_counter()
        with sweep.at(alpha) as model:
            answers[alpha], batches = sample_answers(model, tokenizer, prompts, settings, cfg.batch_size, cfg.seed)
        kl = kl_to(partial(sweep.at, alpha), sweep.baseline, batches, temperature)
        scores = {j: {"policy": judge(prompts, answers[alpha]), "baseline": baseline_scores[j]}
                  for j, judge in judges.items()}  # fmt: skip
        points.append({"alpha": alpha, **compare(cfg, {"policy": answers[alpha], "baseline": baseline}, scores, kl)})
        print(f"alpha {alpha:g} ({i}/{len(cfg.alpha_sweep)}): {format_point(points[-1])} "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    del sweep
    for judge in judges:
        front = pareto_front([(p["kl_policy_to_baseline"], p[judge]["win_rate"]) for p in points])
        for point, on_front in zip(points, front):
            point[judge]["pareto"] = on_front
    result["sweep"] = points
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = [plot_alpha_sweep(points, out_dir / "alpha_sweep.png")] + plot_ppo_logs(out_dir, cfg.ppo_logs)
    result["samples"] = [
        {"prompt": prompt_text(p), "baseline": baseline[i], "alphas": {f"{a:g}": answers[a][i] for a in answers}}
        for i, p in enumerate(prompts)
    ]
    write_json(out_dir / "eval.json", result)
    for judge in judges:
        front = ", ".join(f"{p['alpha']:g}" for p in points if p[judge]["pareto"])
        print(f"Pareto front (KL vs win rate under {judge}): alpha {front}", file=sys.stderr)
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'alpha_sweep.png'}", file=sys.stderr)
    return result


def format_point(point: dict) -> str:
    """One line for one point of a sweep: win rates with intervals, KL, mean words."""
    parts = [f"win rate under {judge} {point[judge]['win_rate']:.3f} [{point[judge]['ci_low']:.3f}, "
             f"{point[judge]['ci_high']:.3f}]" for judge in ("reward_model", "rule") if judge in point]  # fmt: skip
    words = point["response_words"]
    parts.append(f"KL {point['kl_policy_to_baseline']:.3f}")
    parts.append(f"mean words {words['policy']:.1f} vs baseline {words['baseline']:.1f}")
    return "; ".join(parts)


def print_summary(result: dict, show: int) -> None:
    for judge in ("reward_model", "rule"):
        if judge in result:
            r = result[judge]
            print(f"win rate under {judge}: {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                  f"(n={r['n']}; mean policy {r['policy_mean']:.3f} vs baseline {r['baseline_mean']:.3f})", file=sys.stderr)
    print(f"KL(policy || baseline) per response: {result['kl_policy_to_baseline']:.3f}", file=sys.stderr)
    if "unchanged" in result:
        print(f"answers word for word the baseline's: {result['unchanged']} of {len(result['samples'])}", file=sys.stderr)
    if "length_controlled" in result:
        print(format_length_controlled(result["length_controlled"]), file=sys.stderr)
    for s in result["samples"][:show]:
        print(f"\nPROMPT: {s['prompt']}\n  policy:   {s['policy']}\n  baseline: {s['baseline']}", file=sys.stderr)


def format_length_controlled(lc: dict) -> str:
    """The summary lines of ``length_controlled``'s result."""
    matched = (f", {lc['matched_policy_mean_words']:.1f} vs {lc['matched_baseline_mean_words']:.1f} (matched)"
               if lc["n_matched"] else "")
    lines = [
        f"length-controlled (pairs with |words_a - words_b| / max < {lc['tolerance']:g}): {lc['n_matched']} of "
        f"{lc['n_pairs']} pairs; mean words policy {lc['policy_mean_words']:.1f} vs baseline "
        f"{lc['baseline_mean_words']:.1f} (all pairs){matched}"
    ]
    for judge in ("reward_model", "rule"):
        r = lc.get(judge)
        if r is None:
            continue
        if not r["n"]:
            lines.append(f"  length-matched win rate under {judge}: no pair within the tolerance")
        else:
            lines.append(f"  length-matched win rate under {judge}: {r['win_rate']:.3f} "
                         f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']})")
    return "\n".join(lines)
