"""``rlhf eval --alpha_sweep``: theta(alpha) = (1 - alpha) baseline + alpha policy, each evaluated against the baseline."""

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from rlhf import evaluate
from rlhf.alpha_sweep import pareto_front
from rlhf.cli import main
from rlhf.config import build_config
from rlhf.evaluate import EvalConfig, run_eval
from rlhf.export import ExportConfig, run_export
from rlhf.testing import write_jsonl


def lora(base_dir, folder, seed, start=None, targets=("q_proj", "v_proj"), dora=False):
    """A LoRA adapter with random non-zero A and B; ``start``: train on from that adapter (a copy of it, moved)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if start:
        model = PeftModel.from_pretrained(base, start, is_trainable=True)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, use_dora=dora)
        model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def ends(tiny_model_dir, tmp_path, monkeypatch):
    """(SFT adapter, policy adapter trained on from it, prompt file); the rule judges answer length in characters."""
    monkeypatch.setattr(evaluate, "load_rule", lambda name: lambda prompt, response: float(len(response)))
    sft = lora(tiny_model_dir, tmp_path / "sft", seed=1)
    policy = lora(tiny_model_dir, tmp_path / "policy", seed=2, start=sft)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}?"} for i in range(4)])
    return sft, policy, str(prompts)


def eval_cfg(tmp_path, name, **values):
    return build_config(EvalConfig, {"rule": "length", "out_dir": str(tmp_path / name), "max_new_tokens": 5, **values})


def test_pareto_front_hand_computed():
    # (KL, win rate): (0, .5) least KL; (.2, .7) best trade; (.3, .6) worse than (.2, .7) on both;
    # (.5, .9) highest win rate; (.6, .9) same win rate for more KL; (.2, .7) twice: both on the front
    points = [(0.0, 0.5), (0.2, 0.7), (0.3, 0.6), (0.5, 0.9), (0.6, 0.9), (0.2, 0.7)]
    assert pareto_front(points) == [True, True, False, True, False, True]
    assert pareto_front([]) == [] and pareto_front([(1.0, 0.0)]) == [True]


def test_sweep_from_sft_matches_the_baseline_the_policy_and_the_exported_interpolation(ends, tiny_model_dir, tmp_path):
    sft, policy, prompts = ends
    result = run_eval(eval_cfg(tmp_path, "sweep", policy=policy, baseline=sft, dataset_name=prompts,
                               alpha_sweep=[1, 0.5, 0]))  # fmt: skip
    saved = json.loads((tmp_path / "sweep" / "eval.json").read_text())
    assert [p["alpha"] for p in saved["sweep"]] == [0, 0.5, 1]  # increasing, whatever the order given
    assert saved["sweep_from"] == "sft" and saved["n_prompts"] == 4
    assert saved["plots"] == [str(tmp_path / "sweep" / "alpha_sweep.png")]
    assert (tmp_path / "sweep" / "alpha_sweep.png").stat().st_size > 1000
    assert not (tmp_path / "sweep" / "win_rate.png").exists()
    for point in saved["sweep"]:
        rule = point["rule"]
        assert {"win_rate", "ci_low", "ci_high", "n", "pareto"} <= set(rule) and rule["n"] == 4
        assert set(point["response_words"]) == {"policy", "baseline"} and "kl_policy_to_baseline" in point
    # alpha = 0 is the baseline itself: the same answers (all ties), no KL
    zero = saved["sweep"][0]
    assert [s["alphas"]["0"] for s in saved["samples"]] == [s["baseline"] for s in saved["samples"]]
    assert zero["rule"]["ties"] == 4 and zero["rule"]["win_rate"] == 0.5
    assert abs(zero["kl_policy_to_baseline"]) < 1e-5 and zero["rule"]["pareto"]
    # alpha = 1 is the policy: a plain `rlhf eval` of it gives the same answers, win rate and KL
    plain = run_eval(eval_cfg(tmp_path, "plain", policy=policy, baseline=sft, dataset_name=prompts))
    one = result["sweep"][2]
    assert [s["alphas"]["1"] for s in result["samples"]] == [s["policy"] for s in plain["samples"]]
    assert one["rule"] == {**plain["rule"], "pareto": one["rule"]["pareto"]}
    assert one["kl_policy_to_baseline"] == pytest.approx(plain["kl_policy_to_baseline"], abs=1e-4)
    assert one["kl_policy_to_baseline"] > 0.01  # the policy moved away from the SFT adapter
    # alpha = 0.5 is what `rlhf export --mode interpolate --alpha 0.5` writes
    export = build_config(ExportConfig, {"adapter": policy, "mode": "interpolate", "from_": "sft", "sft_adapter": sft,
                                         "alpha": 0.5, "out": str(tmp_path / "half")})  # fmt: skip
    half = run_eval(eval_cfg(tmp_path, "half_eval", policy=str(run_export(export)), baseline=sft, dataset_name=prompts))
    assert [s["alphas"]["0.5"] for s in result["samples"]] == [s["policy"] for s in half["samples"]]
    assert result["sweep"][1]["kl_policy_to_baseline"] == pytest.approx(half["kl_policy_to_baseline"], abs=1e-4)


def test_cli_sweep_from_the_base_model(ends, tiny_model_dir, tmp_path, capsys):
    _, policy, prompts = ends
    out = tmp_path / "sweep"
    assert main(["eval", "--policy", policy, "--baseline", "base", "--model_name_or_path", tiny_model_dir,
                 "--dataset_name", prompts, "--rule", "length", "--max_new_tokens", "5", "--alpha_sweep", "0,1",
                 "--out_dir", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "alpha 0 (1/2): win rate under rule 0.500" in err and "alpha 1 (2/2):" in err  # progress per alpha
    saved = json.loads((out / "eval.json").read_text())
    zero, one = saved["sweep"]
    assert saved["sweep_from"] == "base" and zero["rule"]["win_rate"] == 0.5 and zero["kl_policy_to_baseline"] == 0
    plain = run_eval(eval_cfg(tmp_path, "plain", policy=policy, baseline="base", model_name_or_path=tiny_model_dir,
                              dataset_name=prompts))  # fmt: skip
    assert one["rule"]["win_rate"] == plain["rule"]["win_rate"]
    assert one["kl_policy_to_baseline"] == pytest.approx(plain["kl_policy_to_baseline"], abs=1e-5)
    assert (out / "alpha_sweep.png").is_file()


@pytest.mark.parametrize("alphas, message", [
    ("0,x", "config key 'alpha_sweep' must be a list of numbers or null, got item 'x'"),
    ("0,1.5", "config key 'alpha_sweep' must hold alphas in [0, 1] (no extrapolation), got 1.5"),
    ("-0.5,1", "config key 'alpha_sweep' must hold alphas in [0, 1] (no extrapolation), got -0.5"),
    (",", "config key 'alpha_sweep' lists no alpha"),
    ("0.5,0.5", "config key 'alpha_sweep' lists alpha 0.5 more than once"),
    ("nan", "got item 'nan'"),
])  # fmt: skip
def test_bad_alpha_lists_are_one_line_errors(alphas, message, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--policy", str(tmp_path), "--baseline", "base", "--rule", "length", "--alpha_sweep", alphas,
                 "--out_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unsupported_ends_are_one_line_errors(ends, tiny_model_dir, tmp_path, capsys):
    sft, policy, prompts = ends
    torch.manual_seed(3)
    ia3 = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    other = lora(tiny_model_dir, tmp_path / "other", seed=4, targets=("k_proj", "o_proj"))
    dora = lora(tiny_model_dir, tmp_path / "dora", seed=5, dora=True)
    cases = [
        (tiny_model_dir, sft, "the policy " + tiny_model_dir + " is a full model folder"),
        (str(tmp_path / "ia3"), "base", "is a PEFT IA3 adapter"),
        (policy, tiny_model_dir, "the baseline " + tiny_model_dir + " is a full model folder"),
        (other, sft, "wrap different modules: their interpolation is not one LoRA adapter"),
        (dora, "base", "this interpolation is not exactly one LoRA adapter"),
    ]
    capsys.readouterr()  # the loading bars above
    for i, (pol, base, message) in enumerate(cases):
        out = tmp_path / f"eval{i}"
        code = main(["eval", "--policy", pol, "--baseline", base, "--rule", "length", "--alpha_sweep", "0,1",
                     "--dataset_name", prompts, "--out_dir", str(out)])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err, (pol, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()
