"""Is bf16 faster than fp32 on this CPU for the embedded model with a LoRA on every linear layer?

    python bench/cpu_bf16_probe.py --out bench/results/cpu_bf16_probe.json

Times a no-grad forward and a forward + backward (gradients reach the LoRA only) of 16 rows x 80 tokens, the base
in fp32 or bf16, the LoRA in fp32 (PEFT's default) or in the base's dtype, attention by torch's fused kernel
(``sdpa``, transformers' default) or by plain matrix products (``eager``, what ``rlhf.models.load_base_model`` picks
for bf16 on a CPU). CPUs with AVX512-BF16 (``lscpu`` flags) run bf16 matrix products natively; others convert.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=80)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.models import resolve_model_path

    torch.manual_seed(0)
    path = resolve_model_path("smollm2-135m-instruct")
    ids = torch.randint(0, 49000, (args.rows, args.tokens))
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    record = {
        "command": f"python bench/cpu_bf16_probe.py --out {args.out} --rows {args.rows} --tokens {args.tokens}",
        "code": "commit " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip(),
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": Path("/proc/loadavg").read_text().split()[:3],
        "runs": [],
    }
    runs = ((torch.float32, True, "sdpa"), (torch.bfloat16, True, "sdpa"), (torch.bfloat16, False, "sdpa"),
            (torch.float32, True, "eager"), (torch.bfloat16, True, "eager"))
    for base, lora_fp32, attention in runs:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=base, attn_implementation=attention)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                               autocast_adapter_dtype=lora_fp32)

        def forward():
            with torch.no_grad():
                model(input_ids=ids)

        def forward_backward():
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()

        lora = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
        run = {"base": str(base).removeprefix("torch."), "lora": str(lora).removeprefix("torch."),
               "attention": attention,
               "forward_s": round(timed(forward, 3), 3), "forward_backward_s": round(timed(forward_backward, 2), 3)}
        print(run, flush=True)
        record["runs"].append(run)
    record["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
