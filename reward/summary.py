"""The figures of a trained reward model from its members (:class:`reward.member.MemberResult`): the training
summary of ``metrics.json``, and the held-out metrics and ``reward_stats.json`` of the saved RM (the one member,
or the mean over an ensemble's standardised member scores)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reward.member import MemberResult
    from reward.train import RewardStageConfig

LENGTH_WARNING = 0.5  # |Pearson(reward, response tokens)| above this is reported as a warning sign


def training_summary(cfg: RewardStageConfig, members: list[MemberResult], train_pairs, held_pairs) -> dict:
    """The training figures of ``metrics.json``: one member's, or an ensemble's totals (steps, runtime,
    trained parameters summed; ``train_loss`` averaged) plus a ``members`` list."""
    from rlhf import distributed
    from rlhf.data import fingerprint

    k = len(members)
    trained = [dict(m.metrics) for m in members]
    runtime = sum(m["train_runtime_s"] for m in trained)
    metrics = {
        "world_size": distributed.world_size(),
        "method": cfg.method,
        "train_loss": trained[0]["train_loss"] if k == 1 else sum(m["train_loss"] for m in trained) / k,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(held_pairs),
        "eval_prompts": len({p.prompt_key for p in held_pairs}),
        "steps": sum(m["steps"] for m in trained),
        "stopped_by_time_budget": any(m["stopped_by_time_budget"] for m in trained),  # the limit is per member
        "margin_used": trained[0]["margin_used"],
        "sft_adapter": cfg.sft_adapter,
        "trainable_parameters": sum(m["trainable_parameters"] for m in trained),
        "total_parameters": trained[0]["total_parameters"] + sum(m["trainable_parameters"] for m in trained[1:]),
        "truncated_sequences": trained[0]["truncated_sequences"],
        "train_runtime_s": round(runtime, 2),
        "train_pairs_per_s": round(sum(m["pairs_seen"] for m in trained) / runtime, 3) if runtime else None,
        "dataset_fingerprint": fingerprint(cfg.dataset_name),
        "pooling": members[0].pooling,  # pooling auto: the one the head probe chose
    }
    if k > 1:
        metrics["ensemble"] = k
        for entry, m in zip(trained, members):
            entry.pop("pairs_seen")
            if m.held is not None:
                entry["eval_accuracy"] = held_metrics(m.held, m.held["chosen"], m.held["rejected"])["accuracy"]
            if m.length_head_corr is not None:
                entry["eval_length_head_correlation"] = m.length_head_corr
        metrics["members"] = trained
    if cfg.length_debias != "none":
        metrics["length_debias"] = cfg.length_debias
    if k == 1 and "head_probe" in trained[0]:
        metrics["head_probe"] = trained[0]["head_probe"]  # an ensemble's are in its members list
    return metrics


def held_metrics(held: dict, chosen: list, rejected: list) -> dict:
    from reward.losses import preference_metrics

    return preference_metrics(chosen, rejected, held["margins"], held["chosen_len"], held["rejected_len"])


def member_calibrations(members: list[MemberResult]) -> list[dict]:
    """Each member's ``{"mean", "std"}`` over the stats sample's responses (population std; 1 if constant)."""
    from reward.losses import mean_std

    out = []
    for m in members:
        mean, std = mean_std(m.stats_rewards)
        out.append({"mean": mean, "std": std if std > 1e-6 else 1.0})
    return out


def _calibrated(rows: list[list[float]], calibrations: list[dict]):
    """(K, N) tensor of ``(raw - mean_k) / std_k``."""
    import torch

    raw = torch.tensor(rows, dtype=torch.float64)
    mean = torch.tensor([c["mean"] for c in calibrations], dtype=torch.float64)[:, None]
    std = torch.tensor([c["std"] for c in calibrations], dtype=torch.float64)[:, None]
    return ((raw - mean) / std).float()


def combine_members(
    cfg: RewardStageConfig, members: list[MemberResult], held_pairs, calibrations: list[dict] | None = None
) -> tuple[dict, dict]:
    """(metrics of the RM the folder holds, ``reward_stats.json``): the one member, or the ensemble's mean score.

    An ensemble's member scores are first standardised with ``calibrations`` (see
    :func:`reward.modeling.write_ensemble`); per-member accuracies do not depend on it.
    """
    from reward.evaluate import format_summary
    from reward.losses import mean_std
    from rlhf.ppo.aggregate import aggregate_rewards, aggregate_table, member_std

    k = len(members)
    if k > 1 and calibrations is None:
        calibrations = member_calibrations(members)
    metrics: dict = {}
    if held_pairs:
        first = members[0].held
        n = len(held_pairs)
        if k == 1:
            chosen, rejected = first["chosen"], first["rejected"]
        else:
            per = _calibrated([m.held["chosen"] + m.held["rejected"] for m in members], calibrations)  # (K, 2n)
            mean = aggregate_rewards(per, "mean").tolist()
            chosen, rejected = mean[:n], mean[n:]
        held = held_metrics(first, chosen, rejected)
        metrics = {f"eval_{key}": v for key, v in held.items() if key != "n"}
        if k > 1:
            per_member = [held_metrics(first, m.held["chosen"], m.held["rejected"]) for m in members]
            metrics["eval_member_accuracy"] = [m["accuracy"] for m in per_member]
            metrics["eval_member_length_correlation"] = [m["length_correlation"] for m in per_member]
            metrics["eval_member_disagreement"] = float(member_std(per).mean())
            for how in ("min", "mean_minus_std"):
                agg = aggregate_rewards(per, how).tolist()
                metrics[f"eval_accuracy_{how}"] = held_metrics(first, agg[:n], agg[n:])["accuracy"]
            for i, m in enumerate(per_member):
                print(f"member {i}: held-out " + format_summary(m), file=sys.stderr)
        corrs = [m.length_head_corr for m in members if m.length_head_corr is not None]
        if corrs:
            metrics["eval_length_head_correlation"] = sum(corrs) / len(corrs)
        print(("held-out: " if k == 1 else f"held-out (mean of {k} members): ") + format_summary(held), file=sys.stderr)
        corr = held.get("length_correlation")
        if corr is not None and abs(corr) > LENGTH_WARNING:
            print(
                f"warning: held-out rewards correlate with response length (Pearson {corr:+.2f}); "
                "the RM may be rewarding length itself",
                file=sys.stderr,
            )
    source = "training pairs (chosen and rejected responses)"
    if k == 1:
        mean, std = mean_std(members[0].stats_rewards)
        stats = {"mean": mean, "std": std, "n": len(members[0].stats_rewards), "source": source}
    else:
        per = _calibrated([m.stats_rewards for m in members], calibrations)  # (K, N)
        mean, std = mean_std(aggregate_rewards(per, "mean").tolist())
        stats = {"mean": mean, "std": std, "n": per.shape[1],
                 "source": source + "; mean over members of (raw - calibration.mean) / calibration.std",
                 "ensemble": k, **aggregate_table(per)}
    metrics.update(train_reward_mean=stats["mean"], train_reward_std=stats["std"])
    return metrics, stats
