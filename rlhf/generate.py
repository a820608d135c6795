"""``rlhf generate``: sample responses for a prompt file and write them as JSONL."""

from __future__ import annotations

import dataclasses
import math
import sys

from rlhf.config import Literal, Optional, field, require
from rlhf.data import load_prompts, prompt_text
from rlhf.errors import UserError
from rlhf.outputs import check_not_input, check_output_file, write_jsonl


@dataclasses.dataclass
class SamplingConfig:
    """Sampling keys shared by every stage that generates."""

    max_new_tokens: int = field(64, "maximum new tokens per response")
    do_sample: bool = field(True, "sample (true) or greedy decoding (false)")
    temperature: float = field(0.7, "sampling temperature")
    top_p: float = field(1.0, "nucleus sampling threshold")
    top_k: int = field(0, "top-k sampling (0 = off)")
    batch_size: int = field(8, "prompts per generation batch")

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "config key 'max_new_tokens' must be >= 1")
        require(self.temperature > 0, "config key 'temperature' must be > 0")
        require(0 < self.top_p <= 1, "config key 'top_p' must be in (0, 1]")
        require(self.top_k >= 0, "config key 'top_k' must be >= 0")
        require(self.batch_size >= 1, "config key 'batch_size' must be >= 1")

    def sampling_kwargs(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "batch_size": self.batch_size,
        }


@dataclasses.dataclass
class GenerateConfig(SamplingConfig):
    """Options of ``rlhf generate``."""

    model_name_or_path: str = field("smollm2-135m-instruct", "base model: HF folder, hub id or embedded alias")
    adapter: Optional[str] = field(None, "adapter folder applied on the base (PEFT, loreft or bottleneck_adapter)")
    dataset_name: str = field("sample:prompts_test", "prompts file (`prompt` column: string or messages)")
    out: str = field("generations.jsonl", "output JSONL with `prompt` and `response` (and `score`) per line")
    num_return_sequences: int = field(1, "responses per prompt (one line each)")
    max_prompts: Optional[int] = field(None, "use at most this many prompts")
    seed: int = field(42, "random seed")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", "numeric precision")
    best_of: int = field(
        1, "sample this many answers for each one written and keep those reward_model scores highest (best-of-n)"
    )
    reward_model: Optional[str] = field(
        None, "reward model folder (from rlhf reward) that scores the answers: each line gets its `score`, "
        "each prompt's answers are written best first"
    )

    def __post_init__(self):
        super().__post_init__()
        require(self.num_return_sequences >= 1, "config key 'num_return_sequences' must be >= 1")
        require(self.best_of >= 1, "config key 'best_of' must be >= 1")
        require(self.best_of == 1 or bool(self.reward_model),
                "config key 'best_of' > 1 needs a reward_model to pick with")
        require(self.best_of == 1 or self.do_sample, "config key 'best_of' > 1 needs do_sample: true")
        require(bool(self.out), "config key 'out' must not be empty")
        require(self.max_prompts is None or self.max_prompts >= 1, "config key 'max_prompts' must be >= 1 or null")


def best_of(groups: list[list[str]], scores: list[list[float]], keep: int) -> list[list[tuple[str, float]]]:
    """Per prompt, the ``keep`` answers with the highest scores, best first (equal scores: the earlier sample)."""
    out = []
    for answers, values in zip(groups, scores):
        order = sorted(range(len(answers)), key=lambda i: -values[i])[:keep]
        out.append([(answers[i], values[i]) for i in order])
    return out


def run_generate(cfg: GenerateConfig) -> list[dict]:
    from rlhf.generation import generate_responses
    from rlhf.models import load_model, load_tokenizer, pick_device, pick_dtype

    check_output_file(cfg.out)
    check_not_input(cfg.out, {"dataset_name": cfg.dataset_name, "adapter": cfg.adapter,
                              "reward_model": cfg.reward_model}, "out")  # fmt: skip
    if cfg.reward_model:
        from reward.modeling import read_metadata  # wiring: scoring lives in the reward package

        read_metadata(cfg.reward_model)  # a missing or broken folder stops here, before anything is sampled
    prompts = load_prompts(cfg.dataset_name, cfg.max_prompts)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    device = pick_device()
    model = load_model(cfg.model_name_or_path, cfg.adapter, dtype=pick_dtype(cfg.precision, device), device=device)
    responses = generate_responses(
        model, tokenizer, prompts, num_return_sequences=cfg.num_return_sequences * cfg.best_of, seed=cfg.seed,
        **cfg.sampling_kwargs(),
    )
    if cfg.reward_model:
        from reward import RewardScorer

        del model
        scorer = RewardScorer.from_pretrained(cfg.reward_model, device=device, precision=cfg.precision)
        print(f"scoring {sum(map(len, responses))} answers with {cfg.reward_model}", file=sys.stderr)
        flat = scorer.score([p for p, group in zip(prompts, responses) for _ in group],
                            [r for group in responses for r in group])
        bad = sum(not math.isfinite(v) for v in flat)
        if bad:
            raise UserError(f"the reward model {cfg.reward_model} returned NaN/inf for {bad} of {len(flat)} answers")
        scores, start = [], 0
        for group in responses:
            scores.append(flat[start:start + len(group)])
            start += len(group)
        kept = best_of(responses, scores, cfg.num_return_sequences)
        rows = [{"prompt": prompt_text(p) if len(p) == 1 else p, "response": r, "score": s}
                for p, group in zip(prompts, kept) for r, s in group]
    else:
        rows = [{"prompt": prompt_text(p) if len(p) == 1 else p, "response": r}
                for p, group in zip(prompts, responses) for r in group]
    write_jsonl(cfg.out, rows)
    picked = f" (each the best of {cfg.best_of} by {cfg.reward_model})" if cfg.best_of > 1 else ""
    print(f"wrote {len(rows)} responses to {cfg.out}{picked}", file=sys.stderr)
    return rows
