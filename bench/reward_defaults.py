"""Do the shipped reward-model defaults generalise? Train `rlhf reward` on pairs labelled by rules it was not tuned on.

The candidates of a pipeline work folder (its labels.db: K sampled responses per prompt) are paired
within each prompt and labelled by one of the rules below, none of which is the demo's
`reward/rules.py`. Whole prompts are held out. Then `rlhf reward --config configs/reward.yaml` (plus any
`key=value` overrides) trains on the pairs, and its held-out accuracy, training time and the machine's
load are recorded.

    python bench/reward_defaults.py --work WORK --rules shorter,overlap --max_train_pairs 300 \
        --out bench/results/reward_defaults.json [key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import git_commit, machine  # noqa: E402

STOP = {"what", "which", "when", "where", "does", "that", "this", "with", "from", "have", "your", "about", "give",
        "tell", "explain", "describe", "please", "would", "could", "should", "there", "their", "them", "into"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def shorter(prompt: str, a: str, b: str):
    """Prefer the answer with fewer words; within 3 words it is a tie."""
    d = len(a.split()) - len(b.split())
    return None if abs(d) <= 3 else ("a" if d < 0 else "b")


def overlap(prompt: str, a: str, b: str):
    """Prefer the answer that uses more of the prompt's content words (>= 4 letters); equal counts tie."""
    keys = {w for w in words(prompt) if len(w) >= 4 and w not in STOP}
    da, db = len(keys & set(words(a))), len(keys & set(words(b)))
    return None if da == db else ("a" if da > db else "b")


def no_digits(prompt: str, a: str, b: str):
    """Prefer an answer without digits over one with digits, else the one with more commas (detail)."""
    ha, hb = bool(re.search(r"\d", a)), bool(re.search(r"\d", b))
    if ha != hb:
        return "b" if ha else "a"
    ca, cb = a.count(","), b.count(",")
    return None if ca == cb else ("a" if ca > cb else "b")


RULES = {"shorter": shorter, "overlap": overlap, "no_digits": no_digits}


def candidates(db: Path) -> dict[str, list[str]]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT p.text, r.text FROM responses r JOIN prompts p ON p.id = r.prompt_id "
                       "WHERE r.source = 'policy' ORDER BY r.id").fetchall()
    con.close()
    out: dict[str, list[str]] = {}
    for prompt, text in rows:
        out.setdefault(prompt, []).append(text)
    return out


def labelled_pairs(cands: dict[str, list[str]], rule) -> dict[str, list[dict]]:
    pairs: dict[str, list[dict]] = {}
    for prompt, texts in cands.items():
        for a, b in itertools.combinations(sorted(set(texts)), 2):
            winner = rule(prompt, a, b)
            if winner:
                chosen, rejected = (a, b) if winner == "a" else (b, a)
                pairs.setdefault(prompt, []).append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def split_pairs(pairs: dict[str, list[dict]], seed: int, test_fraction: float, max_train: int
                ) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs): a seeded ``test_fraction`` of the prompts held out whole, at most
    ``max_train`` training pairs."""
    prompts = sorted(pairs)
    random.Random(seed).shuffle(prompts)
    n_test = max(1, round(len(prompts) * test_fraction))
    return [r for p in prompts[n_test:] for r in pairs[p]][:max_train], [r for p in prompts[:n_test] for r in pairs[p]]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="pipeline work folder with labels.db (candidates)")
    ap.add_argument("--rules", default="shorter,overlap,no_digits")
    ap.add_argument("--max_train_pairs", type=int, default=300)
    ap.add_argument("--test_fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/reward_defaults.json")
    ap.add_argument("--config", default="configs/reward.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the reward config")
    args = ap.parse_args()
    work = Path(args.work)
    cands = candidates(work / "labels.db")
    record = {"what": "rlhf reward with the shipped defaults on pairs labelled by rules it was not tuned on",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "commit": git_commit(),
              "config": args.config, "overrides": args.overrides, "candidates": sum(map(len, cands.values())),
              "prompts": len(cands), "runs": []}
    for name in args.rules.split(","):
        train, test = split_pairs(labelled_pairs(cands, RULES[name]), args.seed, args.test_fraction,
                                  args.max_train_pairs)
        folder = work / f"rm_defaults_{name}"
        folder.mkdir(exist_ok=True)
        write_jsonl(folder / "train.jsonl", train)
        write_jsonl(folder / "test.jsonl", test)
        cmd = [sys.executable, "-m", "rlhf.cli", "reward", "--config", args.config, "--dataset_name",
               str(folder / "train.jsonl"), "--eval_dataset_name", str(folder / "test.jsonl"),
               "--output_dir", str(folder / "rm"), "--report_to", "none"]
        for kv in args.overrides:
            key, value = kv.split("=", 1)
            cmd += [f"--{key}", value]
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        metrics = json.loads((folder / "rm" / "metrics.json").read_text())
        run = {"rule": name, "doc": RULES[name].__doc__, "train_pairs": len(train), "test_pairs": len(test),
               "held_out_accuracy": metrics.get("eval_accuracy", metrics.get("accuracy")),
               "length_correlation": metrics.get("eval_length_correlation", metrics.get("length_correlation")),
               **({"member_accuracy": metrics["eval_member_accuracy"]} if "eval_member_accuracy" in metrics else {}),
               "train_runtime_s": metrics.get("train_runtime_s"), "head_probe": metrics.get("head_probe"),
               "stage_wall_s": round(wall, 1),
               "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
               "command": " ".join(cmd[1:])}
        print(json.dumps(run), flush=True)
        record["runs"].append(run)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
