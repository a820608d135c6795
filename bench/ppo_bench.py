"""PPO benchmark: our ``rlhf ppo`` versus TRL 1.0.0's ``trl.experimental.ppo.PPOTrainer``.

Equal settings on both sides: the embedded ``smollm2-135m-instruct`` (fp32, CPU), LoRA r=16 on all
linear layers for the policy, the same prompts, rollouts per step, new tokens, temperature, PPO
epochs and mini-batches, KL coefficient and loss weights. Each side has a policy, a reference,
a value model and a reward model: ours keeps them as adapters on ONE base model (reward = an RM
trained by ``rlhf reward`` attached to the same base); TRL loads the policy (reference = adapter
disabled), a full value model and a separate reward model, as its PPOTrainer requires.

Subcommands::

    python bench/ppo_bench.py peak                 # fp32 matmul peak of this machine (GFLOP/s)
    python bench/ppo_bench.py setup                # a reward-model folder for the runs (rlhf reward, 2 steps)
    python bench/ppo_bench.py install-trl          # /tmp/trl100-venv with torch 2.13.0, trl 1.0.0, transformers<5
    python bench/ppo_bench.py ours [--steps 4]     # one run of our PPO, prints a JSON line
    python bench/ppo_bench.py trl [--steps 4]      # one run of TRL's PPO (run with the TRL venv's python)
    python bench/ppo_bench.py compare --repeats 2  # all of the above, runs interleaved, one process each
                                                   # (--variants ours,trl,ours-rm-all,ours-micro2,ours-shared)
    python bench/ppo_bench.py alignment            # does PPO align? demo pipeline judged by the rule itself
                                                   # (--overlay bench/alignment.yaml: larger RM/PPO budget)

Every run is a fresh process, so ``peak_rss_mb`` (``ru_maxrss``) is that run's own peak.
``rollouts_per_s`` = rollouts / seconds of the training loop (model loading excluded on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
WORK = Path(os.environ.get("PPO_BENCH_DIR", "/tmp/ppo_bench"))
TRL_VENV = Path(os.environ.get("TRL_VENV", "/tmp/trl100-venv"))
SETTINGS = dict(rollouts=8, max_new_tokens=48, ppo_epochs=2, num_mini_batches=2, temperature=0.7, lora_r=16,
                lora_alpha=32, kl_coef=0.05, vf_coef=0.1, learning_rate=5e-5, seed=42)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def prompts_file() -> Path:
    """``sample:prompts`` copied as plain JSONL (the TRL venv does not import rlhf)."""
    path = WORK / "prompts.jsonl"
    if not path.is_file():
        from rlhf.data import resolve_dataset_path

        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text(Path(resolve_dataset_path("sample:prompts")).read_text())
    return path


# subcommands


def cmd_peak(args) -> dict:
    """Best fp32 matmul throughput over a few sizes (GFLOP/s) with ``--threads`` threads."""
    import torch

    set_threads(args.threads)
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            torch.matmul(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return {"what": "fp32_matmul_peak", "threads": args.threads, "gflops": round(best, 1)}


def reward_dir(top_layers: int) -> Path:
    return WORK / ("rm" if top_layers else "rm-all")


def shipped_reward_top_layers() -> int:
    """``lora_top_layers`` of the shipped configs/reward.yaml (the RM shape users get by default)."""
    import yaml

    return int(yaml.safe_load((Path(__file__).parent.parent / "configs" / "reward.yaml").read_text())["lora_top_layers"])


def cmd_setup(args) -> dict:
    """Train reward models for 2 steps on rule-labelled pairs: valid RM folders for both sides' shapes.

    Two shapes: LoRA on the top blocks as in the shipped configs/reward.yaml (``rm/``; the value model
    copies it, so its lower blocks run once per rollout) and LoRA on all blocks (``rm-all/``).
    """
    from reward.train import RewardStageConfig, run_reward

    from rlhf.models import resolve_model_path
    from rlhf.testing import write_jsonl

    resolve_model_path(MODEL)
    WORK.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": json.loads(line)["prompt"], "chosen": "A short, complete answer.",
             "rejected": "a long rambling answer that never quite ends and goes on and on"}
            for line in prompts_file().read_text().splitlines()[:32]]
    prefs = write_jsonl(WORK / "prefs.jsonl", rows)
    made = {}
    for top in (shipped_reward_top_layers(), 0):
        rm = reward_dir(top)
        if not (rm / "reward_model.json").is_file():
            cfg = RewardStageConfig(model_name_or_path=MODEL, dataset_name=str(prefs), output_dir=str(rm), max_steps=2,
                                    per_device_train_batch_size=8, eval_fraction=0.25, report_to="none",
                                    stats_max_pairs=16, max_length=256, lora_top_layers=top)
            run_reward(cfg)
        made[f"lora_top_layers={top}"] = str(rm)
    return {"what": "setup", "reward_models": made}


def cmd_install_trl(args) -> dict:
    """A separate venv for the peer (never the project's): torch 2.13.0 first, then trl 1.0.0."""
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["trl==1.0.0", "transformers<5", "peft<0.18", "accelerate", "datasets"], check=True)
    out = subprocess.run([str(py), "-c", "import trl, transformers, peft, torch; print(trl.__version__, "
                          "transformers.__version__, peft.__version__, torch.__version__)"],
                         check=True, capture_output=True, text=True).stdout.split()
    return {"what": "install-trl", "trl": out[0], "transformers": out[1], "peft": out[2], "torch": out[3]}


def body_params(model_path: str) -> tuple[int, int, int]:
    """(parameters in the transformer blocks, hidden size, vocabulary size) from the model config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (H // c.num_attention_heads)
    per_layer = H * H * 2 + H * kv * 2 + 3 * H * I + 2 * H
    return per_layer * L, H, c.vocab_size


def cmd_ours(args) -> dict:
    from rlhf.models import resolve_model_path
    from rlhf.ppo.config import PPOStageConfig
    from rlhf.ppo.stage import run_ppo

    set_threads(args.threads)
    s = SETTINGS
    out = WORK / "runs" / f"ours-{os.getpid()}"
    cfg = PPOStageConfig(
        model_name_or_path=MODEL, reward_model=str(reward_dir(args.rm_top_layers)), dataset_name=str(prompts_file()),
        output_dir=str(out), max_steps=args.steps, rollout_batch_size=s["rollouts"],
        num_mini_batches=s["num_mini_batches"], ppo_epochs=s["ppo_epochs"], max_new_tokens=s["max_new_tokens"],
        temperature=s["temperature"], lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], kl_coef=s["kl_coef"],
        vf_coef=s["vf_coef"], learning_rate=s["learning_rate"], seed=s["seed"], value_model=args.value_model,
        gradient_accumulation_steps=args.grad_accum,
        report_to="none", progress=False, sample_every=0, save_steps=0, precision="fp32",
    )
    from rlhf.ppo.trainer import PPOTrainer

    cpu, real_train, value_skip = {}, PPOTrainer.train, [0]

    def timed_train(self):
        value_skip[0] = self.actor.value_skip
        start = cpu_seconds()
        try:
            return real_train(self)
        finally:
            cpu["loop"] = cpu_seconds() - start

    PPOTrainer.train = timed_train
    load0 = load_average()
    metrics = run_ppo(cfg)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    step_s = total("time/step_s")
    n_body, H, V = body_params(resolve_model_path(MODEL))
    # policy + value forward/backward per micro-batch; the value pass runs only the blocks above value_skip
    n_layers = int(json.loads((Path(resolve_model_path(MODEL)) / "config.json").read_text())["num_hidden_layers"])
    passes = 1 + ((n_layers - value_skip[0]) / n_layers if args.value_model == "separate" else 0)
    # frozen base: backward = activation gradients only, about the forward's FLOPs -> 4 N per token
    train_flops = total("train/tokens") * 4 * n_body * passes + total("train/response_tokens") * 4 * H * V
    return {
        "what": "ours", "value_model": args.value_model, "rm_lora_top_layers": args.rm_top_layers,
        "value_skip_blocks": value_skip[0], "micro_batch": cfg.per_device_train_batch_size,
        "steps": metrics["steps"],
        "rollouts_per_s": metrics["rollouts"] / metrics["wall_time_s"], "loop_s": metrics["wall_time_s"],
        "rollouts_per_cpu_s": metrics["rollouts"] / cpu["loop"], "load_avg": [load0, load_average()],
        "peak_rss_mb": peak_rss_mb(),
        "share_generation": total("time/generation_s") / step_s,
        "share_scoring_passes": (total("time/forward_s") + total("time/scoring_s")) / step_s,
        "share_training": total("time/training_s") / step_s,
        "train_gflops_per_s": train_flops / total("time/training_s") / 1e9,
        "mean_response_tokens": sum(r["response/length_mean"] for r in rows) / len(rows),
    }


def peer_tokenizer(path: str):
    """The cached folder's tokenizer for transformers 4 (its tokenizer_config names a transformers-5 class)."""
    from transformers import PreTrainedTokenizerFast

    conf = json.loads((Path(path) / "tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"), padding_side="left",
                                  **{k: conf[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in conf})
    tok.chat_template = (Path(path) / "chat_template.jinja").read_text()
    return tok


def cmd_trl(args) -> dict:
    """TRL 1.0.0 experimental PPOTrainer at the same settings (run inside the TRL venv)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    set_threads(args.threads)
    s = SETTINGS
    path = str(Path(os.environ.get("RLHF_HOME", Path.home() / ".cache" / "rlhf")) / "models" / MODEL)
    tok = peer_tokenizer(path)
    prompts = [json.loads(line)["prompt"] for line in prompts_file().read_text().splitlines()]
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    ds = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    cfg = PPOConfig(
        output_dir=str(WORK / "runs" / f"trl-{os.getpid()}"), per_device_train_batch_size=s["rollouts"],
        gradient_accumulation_steps=1, num_mini_batches=s["num_mini_batches"], num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=s["rollouts"], response_length=s["max_new_tokens"],
        temperature=s["temperature"], total_episodes=args.steps * s["rollouts"], stop_token="eos",
        missing_eos_penalty=1.0, kl_coef=s["kl_coef"], vf_coef=s["vf_coef"], learning_rate=s["learning_rate"],
        seed=s["seed"], report_to="none", save_strategy="no", num_sample_generations=0, logging_steps=1,
        bf16=False, fp16=False, use_cpu=True, disable_tqdm=True,
    )
    gen_time = [0.0]
    real_generation = ppo_module.batch_generation

    def timed_generation(*a, **k):
        t = time.perf_counter()
        try:
            return real_generation(*a, **k)
        finally:
            gen_time[0] += time.perf_counter() - t

    ppo_module.batch_generation = timed_generation
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=ds, eval_dataset=ds, value_model=value, peft_config=peft_config)
    load0, cpu0, start = load_average(), cpu_seconds(), time.perf_counter()
    trainer.train()
    loop, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return {"what": "trl", "steps": args.steps, "rollouts_per_s": args.steps * s["rollouts"] / loop, "loop_s": loop,
            "rollouts_per_cpu_s": args.steps * s["rollouts"] / cpu, "load_avg": [load0, load_average()],
            "peak_rss_mb": peak_rss_mb(), "share_generation": gen_time[0] / loop}


def _run(cmd: list[str], env=None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return json.loads(lines[-1])


def cmd_compare(args) -> dict:
    me = [sys.executable, __file__]
    common = ["--steps", str(args.steps), "--threads", str(args.threads)]
    peak = _run(me + ["peak", "--threads", str(args.threads)])
    print(json.dumps(peak), file=sys.stderr, flush=True)
    _run(me + ["setup"])
    if not (TRL_VENV / "bin" / "python").exists():
        _run(me + ["install-trl"])
    runs = []
    variants = {"ours": [], "trl": None, "ours-rm-all": ["--rm_top_layers", "0"], "ours-micro2": ["--grad_accum", "2"],
                "ours-shared": ["--value_model", "shared"]}
    unknown = set(args.variants.split(",")) - set(variants)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
    for i in range(args.repeats):
        for side in args.variants.split(","):
            if side == "trl":
                r = _run([str(TRL_VENV / "bin" / "python"), __file__, "trl"] + common)
            else:
                r = _run(me + ["ours"] + common + variants[side])
            r["variant"] = side
            r["repeat"] = i
            runs.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    result = {"what": "compare", "settings": SETTINGS, "steps": args.steps, "threads": args.threads, "peak": peak,
              "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs}
    (WORK / "compare.json").write_text(json.dumps(result, indent=1))
    return result


def rm_accuracy_by_cause(work: Path) -> dict:
    """Held-out RM accuracy split by what decides each pair under the rule: the full stop (one answer ends
    with ".", the other not) or only the length (both or neither end with ".")."""
    from reward import RewardScorer
    from reward.rules import ends_with_full_stop

    rows = [json.loads(line) for line in (work / "prefs.test.jsonl").read_text().splitlines()]
    scorer = RewardScorer.from_pretrained(str(work / "reward"), device="cpu")
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    out: dict[str, dict] = {}
    for r, c, j in zip(rows, chosen, rejected):
        decided_by_stop = ends_with_full_stop(r["chosen"]) != ends_with_full_stop(r["rejected"])
        cause = "full_stop" if decided_by_stop else "length_only"
        d = out.setdefault(cause, {"pairs": 0, "correct": 0})
        d["pairs"] += 1
        d["correct"] += int(c > j)
    return {k: {**v, "accuracy": v["correct"] / v["pairs"]} for k, v in out.items()}


def cmd_alignment(args) -> dict:
    """Does PPO align? The demo pipeline on the embedded model, judged by the labelling rule itself.

    ``rlhf pipeline`` with ``args.config`` (default configs/demo.yaml), optionally changed by ``args.overlay``
    (bench/alignment.yaml: a larger RM and PPO budget than the 20-minute demo): simulated labelers vote by the
    rule through the real app, an RM trains on those votes, PPO optimises against the RM, and the
    pipeline's eval compares aligned vs SFT greedy answers on the held-out prompts under the RM and
    under the rule. A second eval of the same two adapters samples 3 answers per prompt at the PPO
    temperature (the distribution PPO trained), for more comparisons.
    """
    import yaml

    work = Path(args.work)
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.overlay:  # stage sections are updated key by key, top-level keys replaced
        for key, value in yaml.safe_load(Path(args.overlay).read_text()).items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    cfg["work_dir"] = str(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    start = time.perf_counter()
    subprocess.run([rlhf, "pipeline", "--config", str(work / "bench_config.yaml")], check=True)
    pipeline_s = time.perf_counter() - start
    sampled = work / "eval_sampled"
    if not (sampled / "eval.json").is_file():  # the pipeline's own eval step, sampling at the PPO temperature
        from rlhf.config import build_config, config_fields
        from rlhf.pipeline import PipelineConfig
        from rlhf.pipeline_steps import eval_step
        from rlhf.ppo.config import PPOStageConfig

        temperature = cfg.get("ppo", {}).get("temperature", config_fields(PPOStageConfig)["temperature"].default)
        sampling = {"do_sample": True, "temperature": temperature, "samples_per_prompt": 3, "out_dir": str(sampled),
                    "ppo_logs": None}
        eval_step(build_config(PipelineConfig, {**cfg, "eval": {**cfg.get("eval", {}), **sampling}})).run()
    summary = json.loads((work / "summary.json").read_text())
    steps = [json.loads(line) for line in (work / "ppo" / "logs" / "metrics.jsonl").read_text().splitlines()]

    def judged(path: Path) -> dict:
        ev = json.loads(path.read_text())
        keep = ("n_prompts", "samples_per_prompt", "do_sample", "temperature", "kl_policy_to_baseline",
                "response_words", "reward_model", "rule")
        return {k: ev.get(k) for k in keep}

    result = {
        "what": "alignment", "config": args.config, "overlay": args.overlay, "work": str(work), "pipeline_s": round(pipeline_s, 1),
        "stages": summary["stages"], "rm_heldout_accuracy": summary["rm_heldout_accuracy"],
        "rm_accuracy_by_cause": rm_accuracy_by_cause(work),
        "ppo_steps": len(steps),
        "ppo_curve": [{k: r.get(k) for k in ("step", "score/raw_mean", "reward/mean", "kl/k1", "kl/k3",
                                              "response/length_mean", "response/missing_eos_frac")} for r in steps],
        "eval_greedy": judged(work / "eval" / "eval.json"), "eval_sampled": judged(sampled / "eval.json"),
        "plots": summary["plots"], "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load_average(),
    }
    (work / "alignment.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("alignment", help="the demo pipeline, judged by the labelling rule (see cmd_alignment)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--overlay", default="",
                   help="a YAML of keys changed from --config, e.g. bench/alignment.yaml (larger RM and PPO budget)")
    p.add_argument("--work", default="outputs/bench_alignment")
    for name in ("peak", "setup", "install-trl", "ours", "trl", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--repeats", type=int, default=2)
        p.add_argument("--value_model", default="separate", choices=["separate", "shared"])
        p.add_argument("--grad_accum", type=int, default=1, help="ours: micro-batches per mini-batch (same math)")
        p.add_argument("--variants", default="ours,trl,ours-rm-all,ours-micro2,ours-shared",
                       help="compare: runs per repeat, in this order")
        p.add_argument("--rm_top_layers", type=int, default=None,
                       help="ours: the RM with LoRA on this many top blocks (default: as configs/reward.yaml; 0 = all)")
    args = parser.parse_args()
    if getattr(args, "rm_top_layers", 0) is None:
        args.rm_top_layers = shipped_reward_top_layers()
    fn = {"peak": cmd_peak, "setup": cmd_setup, "install-trl": cmd_install_trl, "ours": cmd_ours, "trl": cmd_trl,
          "compare": cmd_compare, "alignment": cmd_alignment}[args.cmd]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
