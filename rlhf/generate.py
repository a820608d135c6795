"""``rlhf generate``: sample responses for a prompt file and write them as JSONL."""

from __future__ import annotations

import dataclasses
import sys

from rlhf.config import Literal, Optional, field, require
from rlhf.data import load_prompts, prompt_text
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
    out: str = field("generations.jsonl", "output JSONL with `prompt` and `response` per line")
    num_return_sequences: int = field(1, "responses per prompt (one line each)")
    max_prompts: Optional[int] = field(None, "use at most this many prompts")
    seed: int = field(42, "random seed")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", "numeric precision")

    def __post_init__(self):
        super().__post_init__()
        require(self.num_return_sequences >= 1, "config key 'num_return_sequences' must be >= 1")
        require(bool(self.out), "config key 'out' must not be empty")
        require(self.max_prompts is None or self.max_prompts >= 1, "config key 'max_prompts' must be >= 1 or null")


def run_generate(cfg: GenerateConfig) -> list[dict]:
    from rlhf.generation import generate_responses
    from rlhf.models import load_model, load_tokenizer, pick_device, pick_dtype

    check_output_file(cfg.out)
    check_not_input(cfg.out, {"dataset_name": cfg.dataset_name, "adapter": cfg.adapter}, "out")
    prompts = load_prompts(cfg.dataset_name, cfg.max_prompts)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    device = pick_device()
    model = load_model(cfg.model_name_or_path, cfg.adapter, dtype=pick_dtype(cfg.precision, device), device=device)
    responses = generate_responses(
        model, tokenizer, prompts, num_return_sequences=cfg.num_return_sequences, seed=cfg.seed, **cfg.sampling_kwargs()
    )
    rows = [
        {"prompt": prompt_text(p) if len(p) == 1 else p, "response": r}
        for p, group in zip(prompts, responses)
        for r in group
    ]
    write_jsonl(cfg.out, rows)
    print(f"wrote {len(rows)} responses to {cfg.out}", file=sys.stderr)
    return rows
