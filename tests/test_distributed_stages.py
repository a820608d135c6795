"""rlhf sft, reward and dpo on two CPU processes (gloo) against the same stages on one.

One ``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml`` starts a process pair that runs
the stages one after the other (tests/stages_driver.py, through ``rlhf.cli.main``), each with 4 examples per
process; the one-process references run here with 8. ``reward_ensemble`` is ``rlhf reward`` with two members,
the length head (used outside the model's forward) and an evaluation after every step; ``dpo_precomputed`` is
``rlhf dpo`` with the reference's log-probs computed once before training (TRL caches them in a file that rank 0
writes and every process reads); its length term is a
correlation over each process's micro-batch, as over each micro-batch under gradient accumulation, so its
reference is one process with 4 examples and 2 accumulation steps. Same global batch, same data order,
same seed: the trained weights must agree up to float rounding (different padding widths and summation
order; Adam's normalisation can magnify it in an element whose gradient is near zero), within ATOL below.
Without synchronised gradients each process would follow its own half batch and miss by the size of an
update itself (~1e-2).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.testing import write_jsonl

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
WORDS = ["sun", "tree", "river", "cloud", "stone", "bird", "road", "city", "rain", "light"]
RUNS = ("sft", "reward", "dpo", "reward_ensemble", "dpo_precomputed")
LOGGED = {"loss", "grad_norm", "accuracy", "accuracies", "margin", "margins", "mean_token_accuracy"}  # compared
# every element of every trained tensor: |two - one| <= ATOL, 1% of the least that training moves the LoRA B
# weights here (1e-2 in 3 steps at these learning rates; measured: at most 2e-5 apart, in the reward model)
ATOL = 1e-4
MIN_MOVE = 5e-3


# helper functions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sft_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                          {"role": "assistant", "content": f"Word {i} is {WORDS[i % 10]}."}]} for i in range(32)]


def preference_rows() -> list[dict]:
    """1 to 3 pairs per prompt (so batches by prompt have ragged groups): chosen = rejected + ' thanks'."""
    rng = random.Random(0)
    rows = []
    for prompt in range(20):
        for _ in range(1 + prompt % 3):
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            rows.append({"prompt": f"Say something about the {WORDS[prompt % 10]} {prompt}.",
                         "chosen": body + " thanks", "rejected": body})
    return rows  # 39 pairs


def make_sft_adapter(model_dir: str, folder: Path) -> str:
    """A LoRA 'SFT adapter' with random, non-zero A and B, for DPO's policy and reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return str(folder)


def stage_args(run: str, inputs: dict, out: Path, per_device: int, accumulate: int = 1) -> list[str]:
    common = ["--model_name_or_path", inputs["model"], "--output_dir", str(out), "--max_steps", "3",
              "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", str(accumulate),
              "--per_device_eval_batch_size", "4",
              "--report_to", "none", "--logging_steps", "1", "--seed", "7"]  # fmt: skip
    if run == "sft":
        return ["sft", *common, "--dataset_name", inputs["sft"], "--eval_fraction", "0.2", "--lora_r", "4",
                "--lora_alpha", "8", "--lora_dropout", "0", "--learning_rate", "1e-2"]  # fmt: skip
    if run.startswith("reward"):
        extra = ["--ensemble", "2", "--length_debias", "length_head", "--eval_steps", "1"] if run != "reward" else []
        return ["reward", *common, "--dataset_name", inputs["prefs"], "--eval_fraction", "0.2", "--lora_r", "4",
                "--lora_alpha", "8", "--learning_rate", "5e-3", "--stats_max_pairs", "9", *extra]  # fmt: skip
    extra = ["--precompute_ref_log_probs", "true"] if run == "dpo_precomputed" else []
    return ["dpo", *common, "--dataset_name", inputs["prefs"], "--sft_adapter", inputs["sft_adapter"],
            "--eval_fraction", "0.2", "--learning_rate", "1e-2", *extra]  # fmt: skip


def run_in_process(argv: list[str]) -> None:
    from rlhf.cli import main

    assert main(argv) == 0, argv


def launch_two(commands: list[list[str]], watch: Path, tmp: Path) -> subprocess.CompletedProcess:
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"commands": commands, "watch": str(watch), "report": str(tmp / "changes")}))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(CPU_2PROC), "--main_process_port", str(free_port()),
           str(REPO / "tests" / "stages_driver.py"), str(plan)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)  # rlhf.cli must set it itself (no GPU here)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def adapter(folder: Path, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def logged(folder: Path) -> list[dict]:
    """The LOGGED figures of every line of logs/metrics.jsonl (keys like ``member0/eval_accuracy`` included)."""
    lines = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.rsplit("/", 1)[-1].removeprefix("eval_") in LOGGED} for row in lines]


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# the runs: one process pair for all three stages, then the one-process references


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    inputs = {
        "model": tiny_model_dir,
        "sft": str(write_jsonl(tmp / "sft.jsonl", sft_rows())),
        "prefs": str(write_jsonl(tmp / "prefs.jsonl", preference_rows())),
        "sft_adapter": make_sft_adapter(tiny_model_dir, tmp / "sft_adapter"),
    }
    two, one = tmp / "two", tmp / "one"
    done = launch_two([stage_args(r, inputs, two / r, per_device=4) for r in RUNS], two, tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for run in RUNS:  # on one torch thread, as each launched process (tests/conftest.py)
        split = run == "reward_ensemble"  # see the module docstring
        shape = {"per_device": 4, "accumulate": 2} if split else {"per_device": 8}
        run_in_process(stage_args(run, inputs, one / run, **shape))
    changes = {r: json.loads((tmp / f"changes.rank{r}.json").read_text()) for r in (0, 1)}
    return {"two": two, "one": one, "inputs": inputs, "changes": changes, "log": done.stderr}


@pytest.mark.parametrize("stage", RUNS)
def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(runs, stage):
    two, one = runs["two"] / stage, runs["one"] / stage
    assert metrics(two)["world_size"] == 2, "the launch did not form one group of 2 processes"
    assert metrics(one)["world_size"] == 1
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*.safetensors"))
    assert len(files) == (6 if stage == "reward_ensemble" else 1)  # adapter + length head: top level, members/0, /1
    for file in files:
        got, want = adapter(two, file), adapter(one, file)
        assert got.keys() == want.keys() and want
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, atol=ATOL, rtol=0, msg=lambda m: f"{file} {name}: {m}")
    want = adapter(one)
    start = adapter(Path(runs["inputs"]["sft_adapter"])) if stage.startswith("dpo") else {}  # a fresh LoRA's B is 0
    moved = max((t - start.get(n, torch.zeros_like(t))).abs().max().item() for n, t in want.items() if "lora_B" in n)
    assert moved > MIN_MOVE, f"{stage}: training barely moved the weights ({moved:.2e}); the comparison says little"


@pytest.mark.parametrize("stage", RUNS)
def test_held_out_and_logged_metrics_are_those_of_one_process(runs, stage):
    """6 SFT examples or 9 pairs held out, batches of 4 on each of 2 processes: shares of the 8 a step takes
    would be padded with repeats; the metrics must be those of one process over each example once. The
    training logs (loss, gradient norm, accuracy, margins) are over the global batch, gathered from both."""
    two, one = runs["two"] / stage, runs["one"] / stage
    got, want = metrics(two), metrics(one)
    keys = [k for k in want if k.startswith("eval_") and isinstance(want[k], float)]
    held = got.get("eval_pairs", got.get("eval_examples"))
    assert len(keys) >= 2 and held == want.get("eval_pairs", want.get("eval_examples")) and held % 8
    assert {k: got[k] for k in keys} == pytest.approx({k: want[k] for k in keys}, rel=1e-3, abs=1e-4)
    got_logs, want_logs = logged(two), logged(one)
    assert len(got_logs) == len(want_logs) and sum(map(len, want_logs)) >= 6
    for got_row, want_row in zip(got_logs, want_logs):
        if abs(want_row.get("rewards/margins", 1.0)) < 1e-4:  # DPO's first step: policy = reference, so each pair's
            for row in (got_row, want_row):                   # margin is rounding, and so is whether it counts
                row.pop("rewards/accuracies", None)           # as ranked right (the reference's log-probs are
        assert got_row == pytest.approx(want_row, rel=1e-3, abs=1e-4)  # precomputed in other batches on 2 processes)


@pytest.mark.parametrize("stage", RUNS)
def test_only_rank_zero_writes_the_output_folder(runs, stage):
    # but for the caches the datasets library writes beside a dataset it maps, on each process: with precomputed
    # reference log-probs DPO's pairs are read from the staging folder's scratch (trainer/pairs, removed with the
    # trainer's files), so that TRL's cached log-probs are one file that rank 0 writes and every process reads
    scratch = f"{os.sep}dpo_precomputed.incomplete{os.sep}trainer{os.sep}pairs"
    outside = [change for change in runs["changes"][1] if scratch not in change[1]]
    assert outside == [], "rank 1 wrote under the output folders"
    assert len(outside) < len(runs["changes"][1])  # the exception above is still needed
    two, one = runs["two"] / stage, runs["one"] / stage
    assert tree(two) == tree(one)  # same layout as a one-process run
    lines = (two / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((one / "logs" / "metrics.jsonl").read_text().splitlines())  # logged once, not per rank
    assert not list(two.parent.glob("*.incomplete")) and not list(two.parent.glob("*.old"))


def test_reward_held_out_pairs_are_each_scored_once(runs):
    """The two processes score alternate held-out pairs and gather them: the result is that of one scorer over
    every pair, none repeated to even the shares (the held-out count is odd) and none dropped."""
    from reward import RewardScorer
    from reward.evaluate import evaluate_pairs
    from reward.train import RewardStageConfig
    from rlhf.pairs import load_splits

    folder = runs["two"] / "reward"
    got = metrics(folder)
    cfg = RewardStageConfig(model_name_or_path=runs["inputs"]["model"], dataset_name=runs["inputs"]["prefs"],
                            eval_fraction=0.2, seed=7)  # fmt: skip
    _, held = load_splits(cfg)
    assert len(held) % 2 == 1 and got["eval_pairs"] == len(held)
    want = evaluate_pairs(RewardScorer.from_pretrained(folder, precision="fp32"), held, batch_size=4)
    for key in ("accuracy", "mean_margin"):
        assert got[f"eval_{key}"] == pytest.approx(want[key], abs=1e-5)


@pytest.mark.parametrize("by_prompt", [True, False])
def test_reward_batches_split_over_processes_into_the_global_batch(by_prompt):
    """The reward trainer's loader as accelerate shards it for 2 processes: in every step the two ranks get
    distinct pairs that together are the one-process batch of twice the size."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, RandomSampler

    from reward.trainer import GroupedSampler
    from rlhf.hf_trainer import repeated_rows

    n = 39
    groups = [i // 3 for i in range(n)]

    def loader(batch: int, rank: int, world: int):
        sampler = GroupedSampler(groups, seed=7) if by_prompt else RandomSampler(range(n))
        torch.manual_seed(7)
        dl = DataLoader(list(range(n)), batch_size=batch, sampler=sampler)
        return [b.tolist() for b in prepare_data_loader(dl, num_processes=world, process_index=rank,
                                                        put_on_device=False, use_seedable_sampler=True)]  # fmt: skip

    whole = loader(8, 0, 1)
    ranks = [loader(4, r, 2) for r in (0, 1)]
    full_steps = n // 8
    assert len(ranks[0]) == len(ranks[1])
    for step in range(full_steps):
        a, b = ranks[0][step], ranks[1][step]
        assert not set(a) & set(b)
        assert a + b == whole[step]
    # the last step: the one-process batch's 7 rows, and repeated_rows(39, 4, 2) = 1 row of the epoch's start
    last = ranks[0][full_steps] + ranks[1][full_steps]
    assert last[:7] == whole[full_steps] and last[7:] == whole[0][:repeated_rows(n, 4, 2)] == whole[0][:1]


def test_a_deepspeed_or_fsdp_config_that_runs_as_ddp_is_reported(monkeypatch):
    """Without GPUs accelerate trains a DeepSpeed or FSDP config as plain DDP over gloo; the stages say so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhf.hf_trainer import parallel_notice

    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2),
                              train_dataset=range(16), args=SimpleNamespace(per_device_train_batch_size=4))
    assert parallel_notice(trainer) == ""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "asks for DeepSpeed, but accelerate runs MULTI_CPU with 2 process(es)" in parallel_notice(trainer)
    trainer.accelerator.distributed_type = DistributedType.DEEPSPEED
    assert parallel_notice(trainer) == ""
    trainer.train_dataset = range(34)  # 4 full steps of 2 x 4 rows, then 2 rows and 6 repeated
    assert parallel_notice(trainer) == ("note: 34 training rows do not fill whole batches of 4 x 2 processes: each "
                                        "epoch's last step also trains 6 rows of its start again, to give every "
                                        "process a full batch (one process trains that step on 2 rows)")


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"cpu_2proc": ("MULTI_GPU", 2), "single_gpu": ("NO", 1), "multi_gpu": ("MULTI_GPU", 2),
                "deepspeed_zero2": ("DEEPSPEED", 2), "deepspeed_zero3": ("DEEPSPEED", 2), "fsdp": ("FSDP", 2),
                "multi_node": ("MULTI_GPU", 16)}  # fmt: skip
    for name, (kind, processes) in expected.items():
        path = CPU_2PROC.with_name(f"{name}.yaml")
        assert path.read_text().startswith("# accelerate launch --config_file configs/accelerate/"), name
        config = load_config_from_file(str(path))
        assert (config.distributed_type.value, config.num_processes) == (kind, processes), name
    assert load_config_from_file(str(CPU_2PROC.with_name("deepspeed_zero2.yaml"))).deepspeed_config["zero_stage"] == 2
