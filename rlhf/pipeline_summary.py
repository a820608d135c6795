"""What ``rlhf pipeline`` reports at the end: the headline numbers read from what the stages wrote, and the table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.outputs import read_json

if TYPE_CHECKING:
    from rlhf.pipeline import PipelineConfig


def stage_output(path: Path) -> dict:
    """A JSON file a stage wrote, or {} when that stage has not written it."""
    return read_json(path, "stage output") if path.is_file() else {}


def summarize(cfg: PipelineConfig, rows: list[dict]) -> dict:
    """The headline numbers, read from what the stages wrote (so skipped stages count too)."""
    reward = stage_output(cfg.path("reward") / "metrics.json")
    ppo = stage_output(cfg.path("ppo") / "metrics.json") if cfg.align == "ppo" else {}
    dpo = stage_output(cfg.path("dpo") / "metrics.json") if cfg.align == "dpo" else {}
    ev = stage_output(cfg.path("eval") / "eval.json")
    return {
        "stages": rows,
        "total_seconds": round(sum(r["seconds"] for r in rows), 1),
        "align": cfg.align,
        "rm_heldout_accuracy": reward.get("eval_accuracy"),
        "ppo_reward_first_steps": ppo.get("reward_first_steps"),
        "ppo_reward_last_steps": ppo.get("reward_last_steps"),
        "dpo_heldout_reward_accuracy": dpo.get("eval_rewards/accuracies"),
        "dpo_heldout_reward_margin": dpo.get("eval_rewards/margins"),
        "win_rate_vs_sft_rm": ev.get("reward_model", {}).get("win_rate"),
        "win_rate_vs_sft_rule": ev.get("rule", {}).get("win_rate"),
        "kl_to_sft": ev.get("kl_policy_to_baseline"),
        "answers_unchanged": ev.get("unchanged"),
        "answers_judged": len(ev.get("samples", [])) or None,
        "aligned_adapter": str(cfg.path("export")) if cfg.path("export").is_dir() else None,
        "plots": ev.get("plots", []),
    }


def print_summary(summary: dict) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rounds = summary.get("rounds")
    lines = [""] + ([f"round {len(rounds)} (the last that ran)"] if rounds else []) + ["stage        status    seconds"]
    lines += [f"{r['stage']:<12} {r['status']:<9} {r['seconds']:>7.1f}" for r in summary["stages"]]
    lines += [f"{'total':<22} {summary['total_seconds']:>7.1f}"]
    if rounds:
        lines += [f"{'total, all rounds':<22} {summary['all_rounds_seconds']:>7.1f}"]
    lines += [""]
    if summary.get("align", "ppo") == "ppo":
        align_rows = [("PPO reward, first -> last steps",
                       f"{fmt(summary['ppo_reward_first_steps'])} -> {fmt(summary['ppo_reward_last_steps'])}")]
    else:
        align_rows = [("DPO held-out reward accuracy", fmt(summary["dpo_heldout_reward_accuracy"])),
                      ("DPO held-out reward margin", fmt(summary["dpo_heldout_reward_margin"]))]
    unchanged = summary.get("answers_unchanged")
    rows = [
        ("reward model held-out accuracy", fmt(summary["rm_heldout_accuracy"])),
        *align_rows,
        ("win rate vs SFT under the RM", fmt(summary["win_rate_vs_sft_rm"])),
        ("win rate vs SFT under the rule", fmt(summary["win_rate_vs_sft_rule"])),
        ("KL(aligned || SFT) per response", fmt(summary["kl_to_sft"])),
        *([("answers word for word SFT's", f"{unchanged} of {summary['answers_judged']}")]
          if unchanged is not None else []),
        ("aligned adapter", fmt(summary["aligned_adapter"])),
    ]
    lines += [f"{label:<34} {value}" for label, value in rows]
    for plot in summary["plots"]:
        lines.append(f"{'plot':<34} {plot}")
    if summary.get("rounds"):
        lines += ["", "round  RM held-out acc  win vs SFT (rule)  win vs SFT (RM)  KL to SFT  seconds"]
        lines += [f"{r['round']:<6} {fmt(r['rm_heldout_accuracy']):>15}  {fmt(r['win_rate_vs_sft_rule']):>17}  "
                  f"{fmt(r['win_rate_vs_sft_rm']):>15}  {fmt(r['kl_to_sft']):>9}  {r['total_seconds']:>7.1f}"
                  for r in summary["rounds"]]
    print("\n".join(lines))
