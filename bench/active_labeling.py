"""Active vs random selection of the comparisons to label, at equal label budgets.

    python bench/active_labeling.py [--demo /tmp/exp/demo1] [--work /tmp/active_labeling] \
        [--budgets 100,200] [--selections random,uncertainty] [key=value ...]

Starts from a finished round 1 of the demo pipeline (``--demo``: its ``labels.db``, ``prefs.jsonl`` /
``prefs.test.jsonl``, the round-1 reward model ``reward/`` and aligned policy ``ppo/``; nothing there is
written) and plays round 2 once per arm:

1. **Candidates, once for every arm.** A copy of ``labels.db`` gets K responses per prompt from the round-1
   PPO policy: ``rlhf label candidates`` itself (``run_label_candidates``) with the demo's candidate section and
   the seed round 2 of ``rlhf pipeline --rounds 2`` uses (demo seed + 1), its selection step deferred, so only
   responses are stored.
2. **Selection per arm.** Each arm copies that database and runs the stage's selection step
   (``add_selected_comparisons``: ``random``, or ``uncertainty`` scored by the round-1 reward model) with
   ``label_budget`` N over the prompts that are not held out. The new comparisons are labelled by the demo's
   rule with the simulated labelers' decision function (``feedback_ui.simulate.rule_choice``: rule scores
   closer than ``rule_min_gap`` are a tie, and ties are dropped as export drops them).
3. **Reward model per arm.** ``rlhf reward --config configs/reward.yaml`` (only the data paths, the output
   folder and the seed given) on the round-1 training pairs plus the arm's new pairs. Budget 0 trains on the
   round-1 pairs alone (one arm, the start of both curves).
4. **One fixed held-out set for every arm:** the round-1 held-out pairs (``prefs.test.jsonl``) plus every
   rule-labelled, non-tie pair among the round-2 policy's responses to the same held-out prompts. Those
   prompts are never in any arm's training data, in round 1 or round 2.

The record (``bench_record.Record``) goes to ``bench/results/active_labeling.json`` and the curve to
``bench/results/active_labeling.png``. Work is kept in ``--work``: a re-run reuses the candidates and every
reward model already trained there (the record says which arms were reused).

``key=value`` arguments override the reward config (for smoke tests only, e.g. ``max_steps=2``); the
benchmark itself runs with none.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402
import yaml  # noqa: E402
from bench_record import Record, read_jsonl  # noqa: E402

import feedback_ui.candidates as candidates  # noqa: E402
from feedback_ui.config import LabelCandidatesConfig  # noqa: E402
from feedback_ui.simulate import rule_choice  # noqa: E402
from feedback_ui.store import Comparison, Prompt, Response, init_db  # noqa: E402
from reward.rules import ends_with_full_stop  # noqa: E402
from rlhf.data import load_prompts  # noqa: E402
from rlhf.evaluate import load_rule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CANDIDATE_KEYS = ("dataset_name", "max_prompts", "num_candidates", "max_new_tokens", "temperature", "batch_size")


# files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def copy_sqlite(src: Path, dst: Path) -> None:
    """Copy a SQLite file with its ``-wal``/``-shm`` companions (the WAL may hold committed rows)."""
    for suffix in ("", "-wal", "-shm"):
        s = Path(f"{src}{suffix}")
        if s.exists():
            shutil.copy2(s, f"{dst}{suffix}")


def demo_settings(demo: Path) -> dict:
    """The demo's pipeline config as the run saved it (``bench_config.yaml``), else ``configs/demo.yaml``."""
    path = demo / "bench_config.yaml"
    if not path.is_file():
        path = ROOT / "configs" / "demo.yaml"
    return yaml.safe_load(path.read_text())


# labelling by the rule


def decider(a: str, b: str) -> str:
    """What decides a pair under ``rule_score``: one answer ends with a full stop and the other not, or length."""
    return "full_stop" if ends_with_full_stop(a) != ends_with_full_stop(b) else "length"


def label_pair(prompt: str, texts: tuple[str, str], rule, min_gap: float) -> int | None:
    """Index of the chosen answer as a simulated labeler votes on (A, B) = ``texts`` without noise; None: a tie."""
    choice = rule_choice(prompt, list(texts), rule, min_gap, random.Random(0), 0.0)
    return None if choice == "tie" else "AB".index(choice)


def pref_row(group: dict, chosen: int, rule_name: str) -> dict:
    """A row in ``rlhf label export``'s format (one vote without strength: margin 0)."""
    rejected = 1 - chosen
    return {
        "prompt": group["prompt"],
        "chosen": group["texts"][chosen],
        "rejected": group["texts"][rejected],
        "margin": 0.0,
        "annotator": f"rule:{rule_name}",
        "comparison_id": group["comparison_id"],
        "prompt_id": group["prompt_id"],
        "chosen_id": group["ids"][chosen],
        "rejected_id": group["ids"][rejected],
        "outcome": "ranked",
        "n_votes": 1,
    }


def label_groups(groups: list[dict], rule, rule_name: str, min_gap: float) -> tuple[list[dict], int]:
    """Rule-labelled rows of ``groups`` (dicts: prompt, prompt_id, ids, texts, comparison_id) and the tie count."""
    rows, ties = [], 0
    for g in groups:
        chosen = label_pair(g["prompt"], g["texts"], rule, min_gap)
        if chosen is None:
            ties += 1
        else:
            rows.append(pref_row(g, chosen, rule_name))
    return rows, ties


def policy_responses(db: Path, policy: str, prompt_texts: set[str]) -> dict[int, tuple[str, dict[int, str]]]:
    """prompt id -> (prompt text, {response id: text}) of ``policy``'s responses to these prompts."""
    store = init_db(str(db))
    with store.read() as s:
        rows = s.execute(
            sa.select(Prompt.id, Prompt.text, Response.id, Response.text)
            .join(Response, Response.prompt_id == Prompt.id)
            .where(Response.source == "policy", Response.policy == policy)
            .order_by(Prompt.id, Response.id)
        ).all()
    store.close()
    out: dict[int, tuple[str, dict[int, str]]] = {}
    for prompt_id, prompt, rid, text in rows:
        if prompt in prompt_texts:
            out.setdefault(prompt_id, (prompt, {}))[1][rid] = text
    return out


# the steps


def generate(args, cand: dict, base_db: Path) -> dict:
    """Step 1: round-2 responses of the round-1 policy in ``base_db`` (run once, resumable)."""
    done = args.work / "candidates.json"
    if done.is_file():
        return json.loads(done.read_text()) | {"reused": True}
    if not base_db.exists():
        copy_sqlite(args.demo / "labels.db", base_db)
    cfg = LabelCandidatesConfig(db=str(base_db), model_name_or_path=args.model, adapter=str(args.demo / "ppo"),
                                seed=args.seed, selection="random", label_budget=1, **cand)  # fmt: skip
    # selection random|uncertainty stores responses only and then selects; the selection runs per arm instead
    deferred = {"candidate_comparisons": 0, "already_selected": 0, "selected": 0}
    start = time.perf_counter()
    with mock.patch.object(candidates, "add_selected_comparisons", lambda *a, **k: deferred):
        summary = candidates.run_label_candidates(cfg)
    summary = {"seconds": round(time.perf_counter() - start, 1), **summary}
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def held_out_set(args, policy: str, base_db: Path, test_prompts: set[str], rule, min_gap: float) -> dict:
    """Step 4's fixed held-out file: round-1 test pairs + every non-tie round-2 pair on the same prompts."""
    round1 = read_jsonl(args.demo / "prefs.test.jsonl")
    groups = []
    for prompt_id, (prompt, texts) in policy_responses(base_db, policy, test_prompts).items():
        for ids in candidates.comparison_groups(list(texts), "pairwise"):
            groups.append({"prompt": prompt, "prompt_id": prompt_id, "ids": tuple(ids),
                           "texts": (texts[ids[0]], texts[ids[1]]), "comparison_id": None})  # fmt: skip
    round2, ties = label_groups(groups, rule, args.rule_name, min_gap)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected", "margin")} for r in round1 + round2]
    path = args.work / "heldout.jsonl"
    write_jsonl(path, rows)
    parts = ["round1_test"] * len(round1) + ["round2_heldout"] * len(round2)
    return {
        "path": path,
        "parts": parts,
        "deciders": [decider(r["chosen"], r["rejected"]) for r in rows],
        "round1_pairs": len(round1),
        "round1_prompts": len({r["prompt"] for r in round1}),
        "round2_pairs": len(round2),
        "round2_ties_dropped": ties,
        "round2_prompts": len({r["prompt"] for r in round2}),
    }


def select_and_label(args, arm: Path, selection: str, budget: int, cand: dict, policy: str, base_db: Path,
                     train_prompts: list, rule, min_gap: float) -> dict:  # fmt: skip
    """Step 2: the arm's comparisons (the stage's own selection step), labelled by the rule."""
    db = arm / "labels.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    copy_sqlite(base_db, db)
    store = init_db(str(db))
    with store.read() as s:
        before = s.scalar(sa.select(sa.func.max(Comparison.id))) or 0
    cfg = LabelCandidatesConfig(db=str(db), model_name_or_path=args.model, adapter=str(args.demo / "ppo"),
                                seed=args.seed, selection=selection, label_budget=budget,
                                reward_model=str(args.demo / "reward") if selection == "uncertainty" else None,
                                **cand)  # fmt: skip
    start = time.perf_counter()
    summary = candidates.add_selected_comparisons(store, train_prompts, policy, cfg)
    seconds = time.perf_counter() - start
    with store.read() as s:
        created = s.execute(
            sa.select(Comparison.id, Comparison.prompt_id, Comparison.response_ids, Prompt.text)
            .join(Prompt, Prompt.id == Comparison.prompt_id)
            .where(Comparison.id > before)
            .order_by(Comparison.id)
        ).all()
        texts = dict(s.execute(sa.select(Response.id, Response.text).where(
            Response.id.in_([i for c in created for i in c.response_ids]))).all())  # fmt: skip
    store.close()
    groups = [{"prompt": c.text, "prompt_id": c.prompt_id, "ids": tuple(c.response_ids),
               "texts": tuple(texts[i] for i in c.response_ids), "comparison_id": c.id} for c in created]  # fmt: skip
    rows, ties = label_groups(groups, rule, args.rule_name, min_gap)
    write_jsonl(arm / "new_pairs.jsonl", rows)
    return {
        "selected": len(created),
        "usable_pairs": len(rows),
        "ties_dropped": ties,
        "prompts_covered": len({g["prompt_id"] for g in groups}),
        "usable_full_stop_pairs": sum(decider(r["chosen"], r["rejected"]) == "full_stop" for r in rows),
        "usable_length_only_pairs": sum(decider(r["chosen"], r["rejected"]) == "length" for r in rows),
        "candidate_comparisons": summary["candidate_comparisons"],
        "selection_s": round(seconds, 1),
        "comparison_ids": [g["comparison_id"] for g in groups],
    }


def train_reward(args, arm: Path, train_file: Path, heldout: Path) -> dict:
    """Step 3: ``rlhf reward`` with the shipped config, only paths and seed given (+ smoke-test overrides)."""
    out = arm / "rm"
    if (out / "metrics.json").is_file():
        return {"reused": True, "metrics": json.loads((out / "metrics.json").read_text()), "stage_wall_s": None,
                "command": None}  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "rlhf.cli", "reward", "--config", str(args.reward_config),
           "--dataset_name", str(train_file), "--eval_dataset_name", str(heldout),
           "--output_dir", str(out), "--seed", str(args.rm_seed)]  # fmt: skip
    for kv in args.overrides:
        key, value = kv.split("=", 1)
        cmd += [f"--{key}", value]
    start = time.perf_counter()
    with open(arm / "reward.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    return {"reused": False, "metrics": json.loads((out / "metrics.json").read_text()),
            "stage_wall_s": round(wall, 1), "command": " ".join(["rlhf", *cmd[3:]])}  # fmt: skip


def score(rm_dir: Path, held: dict) -> dict:
    """Accuracy of one RM on the fixed held-out set: in all and by part and by what decides the pair."""
    from reward.evaluate import score_pairs
    from reward.losses import preference_metrics
    from reward.scorer import RewardScorer
    from rlhf.pairs import load_pairs

    pairs = load_pairs(str(held["path"]))
    scorer = RewardScorer.from_pretrained(str(rm_dir))
    s = score_pairs(scorer, pairs)
    del scorer
    won = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(s["chosen"], s["rejected"])]
    metrics = preference_metrics(s["chosen"], s["rejected"], s["margins"], s["chosen_len"], s["rejected_len"])
    out = {"accuracy": metrics["accuracy"], "n": metrics["n"], "correct": sum(won),
           "length_correlation": metrics.get("length_correlation")}  # fmt: skip
    for name, labels in (("part", held["parts"]), ("decider", held["deciders"])):
        for value in sorted(set(labels)):
            picked = [w for w, lab in zip(won, labels) if lab == value]
            out[f"{value}_accuracy"] = sum(picked) / len(picked)
            out[f"{value}_correct"] = sum(picked)
            out[f"{value}_n"] = len(picked)
    return out


# the figure


def plot(arms: list[dict], reference: dict, held: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    start = next((a for a in arms if a["budget"] == 0), None)
    for selection, style, offset in (("random", "o-", (4, 6)), ("uncertainty", "s-", (4, -12))):
        line = ([start] if start else []) + sorted((a for a in arms if a["selection"] == selection),
                                                    key=lambda a: a["budget"])  # fmt: skip
        if len(line) <= (1 if start else 0):
            continue
        xs, ys = [a["budget"] for a in line], [a["heldout"]["accuracy"] for a in line]
        ax.plot(xs, ys, style, label=selection)
        for a, x, y in zip(line, xs, ys):
            if a["budget"]:
                ax.annotate(f"{a['usable_pairs']} usable", (x, y), textcoords="offset points", xytext=offset,
                            fontsize=7)  # fmt: skip
    ax.axhline(reference["accuracy"], color="grey", ls="--", lw=1, label="round-1 RM (demo settings)")
    ax.set_xlabel("round-2 comparisons selected (label budget)")
    ax.set_ylabel(f"held-out accuracy ({reference['n']} pairs)")
    ax.set_title(f"Active vs random labeling: RM held-out accuracy\n({held['round1_pairs']} round-1 + "
                 f"{held['round2_pairs']} round-2 held-out pairs, {held['round1_prompts']} prompts)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("/tmp/exp/demo1"), help="finished round-1 pipeline folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/active_labeling"), help="work folder")
    ap.add_argument("--budgets", default="100,200", help="label budgets (comparisons); 0 = round-1 pairs only")
    ap.add_argument("--selections", default="random,uncertainty")
    ap.add_argument("--seed", type=int, default=None, help="round-2 sampling and random-selection seed "
                    "(default: the demo's seed + 1, as round 2 of `rlhf pipeline` uses)")
    ap.add_argument("--rm_seed", type=int, default=None, help="reward-model seed (default: the reward config's)")
    ap.add_argument("--max_prompts", type=int, default=None, help="default: the demo's candidate section")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default: the demo's candidate section")
    ap.add_argument("--reward_config", type=Path, default=ROOT / "configs" / "reward.yaml")
    ap.add_argument("--record", default=None, help="record file (default bench/results/active_labeling.json)")
    ap.add_argument("--png", type=Path, default=ROOT / "bench" / "results" / "active_labeling.png")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the reward config (smoke tests only)")
    args = ap.parse_args()
    record = Record("active_labeling", path=args.record)

    demo = demo_settings(args.demo)
    cand = {k: demo["candidates"][k] for k in CANDIDATE_KEYS if k in demo["candidates"]}
    for key in ("max_prompts", "max_new_tokens"):
        if getattr(args, key) is not None:
            cand[key] = getattr(args, key)
    args.model = demo.get("model_name_or_path", "smollm2-135m-instruct")
    args.seed = demo.get("seed", 42) + 1 if args.seed is None else args.seed
    reward_cfg = yaml.safe_load(args.reward_config.read_text())
    args.rm_seed = reward_cfg.get("seed", 42) if args.rm_seed is None else args.rm_seed
    args.rule_name, min_gap = demo.get("rule", "rule_score"), float(demo.get("rule_min_gap", 0.1))
    rule = load_rule(args.rule_name)
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    selections = [s for s in args.selections.split(",") if s]
    args.work.mkdir(parents=True, exist_ok=True)
    base_db = args.work / "round2.db"

    # 1. candidates of the round-1 policy, once
    generation = generate(args, cand, base_db)
    policy = candidates.policy_identity(args.model, str(args.demo / "ppo"))
    print(f"candidates: {json.dumps(generation)}", file=sys.stderr)

    # the prompts: the held-out ones are round 1's, never trained on
    test_prompts = {r["prompt"] for r in read_jsonl(args.demo / "prefs.test.jsonl")}
    prompts = load_prompts(cand["dataset_name"], cand.get("max_prompts"))
    shown = [candidates.prompt_display_text(p) for p in prompts]
    train_prompts = [p for p, text in zip(prompts, shown) if text not in test_prompts]
    held = held_out_set(args, policy, base_db, set(shown) & test_prompts, rule, min_gap)
    print(f"held-out: {held['round1_pairs']} round-1 + {held['round2_pairs']} round-2 pairs", file=sys.stderr)
    round1_train = read_jsonl(args.demo / "prefs.jsonl")

    # the round-1 RM (demo settings) on the same held-out set: the reference line
    reference = score(args.demo / "reward", held)

    # 2.-4. the arms
    plan = [("none", 0)] if 0 in budgets else []
    plan += [(s, b) for b in budgets if b > 0 for s in selections]
    arms = []
    for selection, budget in plan:
        name = "round1_only" if budget == 0 else f"{selection}_{budget}"
        arm = args.work / name
        arm.mkdir(exist_ok=True)
        info = {"arm": name, "selection": selection, "budget": budget}
        if budget:
            info.update(select_and_label(args, arm, selection, budget, cand, policy, base_db, train_prompts, rule,
                                         min_gap))  # fmt: skip
            new = read_jsonl(arm / "new_pairs.jsonl")
        else:
            info.update(selected=0, usable_pairs=0, ties_dropped=0)
            new = []
        train_file = arm / "train.jsonl"
        write_jsonl(train_file, round1_train + new)
        trained = train_reward(args, arm, train_file, held["path"])
        m = trained["metrics"]
        info.update(
            train_pairs=len(round1_train) + len(new),
            rm_reused=trained["reused"],
            rm_command=trained["command"],
            rm_train_runtime_s=m.get("train_runtime_s"),
            rm_stage_wall_s=trained["stage_wall_s"],
            rm_steps=m.get("steps"),
            rm_eval_accuracy_in_training=m.get("eval_accuracy"),
            heldout=score(arm / "rm", held),
        )
        arms.append(info)
        h = info["heldout"]
        print(f"{name}: {info['usable_pairs']} usable of {info['selected']} selected, train {info['train_pairs']} "
              f"pairs, held-out {h['accuracy']:.3f} ({h['correct']:g}/{h['n']}), RM {m.get('train_runtime_s')} s",
              file=sys.stderr)  # fmt: skip

    plot(arms, reference, held, args.png)
    figures = {
        "arms": arms,
        "round1_rm_demo_settings": reference,
        "heldout": {k: v for k, v in held.items() if k not in ("path", "parts", "deciders")} | {
            "full_stop_pairs": held["deciders"].count("full_stop"),
            "length_only_pairs": held["deciders"].count("length"),
        },
        "generation": generation,
        "png": str(args.png.relative_to(ROOT) if args.png.is_relative_to(ROOT) else args.png),
    }
    settings = {
        "demo": str(args.demo),
        "work": str(args.work),
        "policy": policy,
        "candidates": cand | {"seed": args.seed},
        "random_selection_seed": args.seed,
        "uncertainty_reward_model": str(args.demo / "reward"),
        "rule": args.rule_name,
        "rule_min_gap": min_gap,
        "budgets": budgets,
        "selections": selections,
        "reward_config": str(args.reward_config.relative_to(ROOT) if args.reward_config.is_relative_to(ROOT)
                             else args.reward_config),
        "reward_config_values": reward_cfg,
        "reward_seed": args.rm_seed,
        "reward_overrides": args.overrides,
        "round1_train_pairs": len(round1_train),
        "train_prompts_in_pool": len(train_prompts),
        "heldout_definition": (
            "round-1 prefs.test.jsonl (the demo's held-out prompts) + every pair of distinct round-2 responses "
            "of the round-1 PPO policy to those same prompts, labelled by the rule (ties dropped); "
            "no arm trains on any of these prompts"
        ),
    }
    record.write(figures, settings)
    print(json.dumps({a["arm"]: [a["usable_pairs"], round(a["heldout"]["accuracy"], 3)] for a in arms}))


if __name__ == "__main__":
    main()
