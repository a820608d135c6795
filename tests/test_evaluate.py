import json
import math

import pytest
import torch

from rlhf import evaluate
from rlhf.config import build_config
from rlhf.errors import ConfigError
from rlhf.evaluate import EvalConfig, plot_training_curves, run_eval, win_rate
from rlhf.testing import write_jsonl


def test_win_rate_hand_computed():
    # pairs: 3>1 win, 1<2 loss, 2=2 tie, 2>0 win -> p = (2 + 0.5) / 4 = 0.625
    # Wilson, z=1.96, n=4: denom = 1 + 3.8416/4 = 1.9604; centre = (0.625 + 0.4802) / 1.9604 = 0.563763
    # half = 1.96 * sqrt(0.625*0.375/4 + 3.8416/64) / 1.9604 = 1.96 * 0.344411 / 1.9604 = 0.344341
    r = win_rate([3, 1, 2, 2], [1, 2, 2, 0])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == 0.625
    assert r["ci_low"] == pytest.approx(0.219422, abs=1e-5)
    assert r["ci_high"] == pytest.approx(0.908103, abs=1e-5)
    # all wins, n=10: centre = 1.19208/1.38416 = 0.861230, half = 1.96*0.098/1.38416 = 0.138770
    r = win_rate([1] * 10, [0] * 10)
    assert r["win_rate"] == 1.0 and r["ci_low"] == pytest.approx(0.722460, abs=1e-5) and r["ci_high"] == 1.0
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


def test_the_interval_holds_the_rate_when_every_comparison_goes_one_way(tmp_path):
    # at p = 1 the Wilson upper end is 1 and at p = 0 the lower end is 0, exactly; rounding put them a hair inside
    # for 73 of the sizes 1..200 (44: 0.9999999999999999), and the win-rate plot then refused a negative error bar
    for n in range(1, 201):
        assert win_rate([1.0] * n, [0.0] * n)["ci_high"] == 1.0
        assert win_rate([0.0] * n, [1.0] * n)["ci_low"] == 0.0
    result = {"reward_model": win_rate([1.0] * 44, [0.0] * 44), "rule": win_rate([0.0] * 44, [1.0] * 44)}
    assert evaluate.plot_results(result, tmp_path, None) == [str(tmp_path / "win_rate.png")]


def test_training_curves_plot(tmp_path):
    rows = [{"step": i, "reward_mean": i * 0.1, "kl": i * 0.01, "kl_coef": 0.05} for i in range(5)]
    path = plot_training_curves(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and path.endswith("c.png")


def test_eval_end_to_end_on_tiny_models(tiny_model_dir, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "policy")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}?"} for i in range(5)])
    monkeypatch.setattr(evaluate, "load_rule", lambda name: lambda prompt, response: float(len(response)))
    cfg = build_config(EvalConfig, {
        "policy": str(tmp_path / "policy"), "baseline": "base", "model_name_or_path": tiny_model_dir,
        "dataset_name": str(prompts), "rule": "length", "out_dir": str(tmp_path / "eval"), "max_new_tokens": 6,
    })
    result = run_eval(cfg)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    # the rule (answer length) judged each saved pair of answers: count its outcomes by hand from them
    pairs = [(len(s["policy"]), len(s["baseline"])) for s in saved["samples"]]
    wins, ties = sum(p > b for p, b in pairs), sum(p == b for p, b in pairs)
    assert len(pairs) == saved["rule"]["n"] == 5
    assert (saved["rule"]["wins"], saved["rule"]["ties"], saved["rule"]["losses"]) == (wins, ties, 5 - wins - ties)
    assert saved["rule"]["win_rate"] == pytest.approx((wins + ties / 2) / 5)
    assert saved["kl_policy_to_baseline"] > 0  # a random LoRA moves the policy away from the base
    assert saved["unchanged"] == sum(s["policy"].strip() == s["baseline"].strip() for s in saved["samples"])
    assert (tmp_path / "eval" / "win_rate.png").is_file()
    for side in ("policy", "baseline"):
        words = [len(s[side].split()) for s in saved["samples"]]
        assert result["response_words"][side] == pytest.approx(sum(words) / 5)


def test_identical_policies_have_zero_kl(tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    monkeypatch.setattr(evaluate, "load_rule", lambda name: lambda prompt, response: 0.0)
    cfg = build_config(EvalConfig, {
        "policy": tiny_model_dir, "baseline": tiny_model_dir, "dataset_name": str(prompts), "rule": "x",
        "out_dir": str(tmp_path / "eval"), "max_new_tokens": 4,
    })
    result = run_eval(cfg)
    assert abs(result["kl_policy_to_baseline"]) < 1e-5
    assert result["rule"]["ties"] == 2 and result["rule"]["win_rate"] == 0.5
    assert result["unchanged"] == 2  # the same model answers both prompts as the baseline does
    # Wilson, z=1.96, n=2, p=0.5: denom = 1 + 3.8416/2 = 2.9208; centre = (0.5 + 0.9604) / 2.9208 = 0.5
    # half = 1.96 * sqrt(0.25/2 + 3.8416/16) / 2.9208 = 1.96 * 0.604235 / 2.9208 = 0.405471
    assert result["rule"]["ci_low"] == pytest.approx(0.094529, abs=1e-5)
    assert result["rule"]["ci_high"] == pytest.approx(0.905471, abs=1e-5)


def test_several_samples_per_prompt(tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    monkeypatch.setattr(evaluate, "load_rule", lambda name: lambda prompt, response: float(len(response)))
    values = {"policy": tiny_model_dir, "baseline": tiny_model_dir, "dataset_name": str(prompts), "rule": "x",
              "out_dir": str(tmp_path / "eval"), "max_new_tokens": 8, "samples_per_prompt": 3}
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        build_config(EvalConfig, values)  # greedy decoding would give the same answer three times
    result = run_eval(build_config(EvalConfig, {**values, "do_sample": True, "temperature": 1.0}))
    assert result["n_prompts"] == 2 and result["rule"]["n"] == 6
    assert [s["prompt"] for s in result["samples"]] == ["hi"] * 3 + ["yo"] * 3
    # sampled, not repeated: a random tiny model gives different answers to the same prompt
    assert len({s["policy"] for s in result["samples"][:3]}) > 1


class FixedLogits:
    """A stand-in model whose next-token distribution at position t is ``probs[t]``, whatever the input."""

    def __init__(self, probs):
        self.logits = torch.tensor(probs).log()[None]  # (1, T, V)

    def __call__(self, input_ids, attention_mask, position_ids):
        return type("Out", (), {"logits": self.logits})()

    def get_output_embeddings(self):
        return torch.nn.Linear(1, self.logits.shape[-1], bias=False)


def test_kl_is_the_exact_next_token_kl_along_the_answer_and_the_log_ratio_is_reported_beside_it():
    from contextlib import nullcontext

    from rlhf.evaluate import kl_to

    prompt, answer, mask = torch.tensor([[7]]), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.long)
    policy = FixedLogits([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])  # positions 0 and 1 predict the answer's tokens
    reference = FixedLogits([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    batches = [(prompt, mask[:, :1], answer, mask)]
    kl, log_ratio = kl_to(lambda: nullcontext(policy), lambda: nullcontext(reference), batches, temperature=1.0)
    # token 1: both 50/50, KL 0; token 2: 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.36806
    assert kl == pytest.approx([0.9 * math.log(1.8) + 0.1 * math.log(0.2)], abs=1e-5)
    assert kl[0] == pytest.approx(0.36806, abs=1e-4)
    # the answer took the unlikely second token: its log-ratio is negative, no KL
    assert log_ratio == pytest.approx([math.log(0.5 / 0.5) + math.log(0.1 / 0.5)], abs=1e-5)


def test_kl_over_a_padded_batch_taken_a_few_rows_at_a_time_equals_each_answer_alone(tiny_model_dir, monkeypatch):
    from contextlib import nullcontext

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.evaluate import kl_to, sample_answers
    from rlhf.generation import SamplingSettings
    from rlhf.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompts = ["Hi.", "Tell me a much longer story about a cat, please."]  # padded to each other's length
    settings = SamplingSettings(max_new_tokens=6, do_sample=False)
    _, together = sample_answers(policy, tok, prompts, settings, batch_size=2, seed=0)
    monkeypatch.setattr(evaluate, "KL_CHUNK_ELEMENTS", 1)  # one row at a time
    args = (lambda: nullcontext(policy), lambda: nullcontext(reference))
    kl_rows, ratio_rows = kl_to(*args, together, temperature=1.0)
    alone = [kl_to(*args, sample_answers(policy, tok, [p], settings, 1, 0)[1], temperature=1.0) for p in prompts]
    assert kl_rows == pytest.approx([a[0][0] for a in alone], abs=1e-4)
    assert ratio_rows == pytest.approx([a[1][0] for a in alone], abs=1e-4)
    assert all(k > 0 for k in kl_rows)
