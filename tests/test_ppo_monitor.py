"""Over-optimisation monitor: held-out proxy/gold scores, sqrt(KL), checkpoint selection."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.errors import ConfigError
from rlhf.ppo import wiring
from rlhf.ppo.monitor import MonitorPoint, best_point
from rlhf.ppo.scorers import FunctionScorer, TokenCountScorer
from rlhf.ppo.stage import run_ppo
from test_ppo_stage import REWARDED, ppo_config, read_jsonl


def test_best_point_takes_the_highest_score_and_the_earliest_of_equals():
    pts = [MonitorPoint(0, 1.0, 0.2, 0.0, 5), MonitorPoint(2, 3.0, 0.7, 1.0, 5),
           MonitorPoint(4, 5.0, 0.7, 4.0, 5), MonitorPoint(6, 6.0, 0.1, 9.0, 5)]
    assert best_point(pts, "gold").step == 2      # 0.7 at steps 2 and 4: the earlier one, less KL
    assert best_point(pts, "proxy").step == 6
    assert best_point([MonitorPoint(0, 1.0, None, 0.0, 5)], "gold") is None
    assert pts[2].sqrt_kl == 2.0


def test_config_rules():
    with pytest.raises(ConfigError, match="eval_dataset_name"):
        ppo_config("m", "o", eval_steps=2)
    with pytest.raises(ConfigError, match="eval_steps"):
        ppo_config("m", "o", select_checkpoint="best_proxy_heldout")
    with pytest.raises(ConfigError, match="gold"):
        ppo_config("m", "o", eval_steps=2, eval_dataset_name="sample:prompts_test", select_checkpoint="best_gold")


def test_best_gold_exports_the_policy_of_the_best_scripted_step(tiny_model_dir, tmp_path, monkeypatch):
    script = iter([0.1, 0.2, 0.9, 0.3])       # gold scores of the monitor points at steps 0, 2, 4, 6

    def scripted(prompts, responses):
        value = next(script)
        return [value] * len(responses)

    monkeypatch.setattr(wiring, "load_gold_scorer", lambda cfg: FunctionScorer(scripted))
    out = tmp_path / "run"
    cfg = ppo_config(tiny_model_dir, out, max_steps=6, save_steps=2, save_total_limit=None, eval_steps=2,
                     eval_dataset_name="sample:prompts_test", eval_max_prompts=3, gold="scripted",
                     select_checkpoint="best_gold", learning_rate=1e-2)
    metrics = run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    assert metrics["selected_step"] == 4
    assert [p["step"] for p in metrics["monitor"]] == [0, 2, 4, 6]
    assert [round(p["gold"], 6) for p in metrics["monitor"]] == [0.1, 0.2, 0.9, 0.3]
    assert metrics["monitor"][0]["kl"] == 0.0 and metrics["monitor"][2]["kl"] != 0.0
    exported = load_file(str(out / "adapter_model.safetensors"))
    at_4 = load_file(str(out / "checkpoints" / "step-000004" / "policy" / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-000006" / "policy" / "adapter_model.safetensors"))
    assert exported.keys() == at_4.keys()
    assert all(torch.equal(exported[k], at_4[k]) for k in exported)
    assert not all(torch.equal(exported[k], last[k]) for k in exported)   # step 6 differs: the choice mattered
    rows = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "monitor/gold" in r]
    assert [r["step"] for r in rows] == [0, 2, 4, 6] and all("monitor/sqrt_kl" in r for r in rows)
    assert (out / "logs" / "monitor.png").stat().st_size > 0


def test_rule_gold_and_proxy_selection(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = ppo_config(tiny_model_dir, out, max_steps=2, eval_steps=1, eval_dataset_name="sample:prompts_test",
                     eval_max_prompts=2, gold="rule:rule_score", select_checkpoint="best_proxy_heldout")
    metrics = run_ppo(cfg, scorer=TokenCountScorer(REWARDED))
    points = metrics["monitor"]
    assert len(points) == 3 and all(0.0 <= p["gold"] <= 1.0 for p in points)
    best = max(points, key=lambda p: (p["proxy"], -p["step"]))
    assert metrics["selected_step"] == best["step"]
    assert json.loads((out / "metrics.json").read_text())["selected_step"] == best["step"]


def test_monitor_counts_empty_answers(tiny_model_dir, tmp_path, monkeypatch):
    """The monitor's held-out answers that hold nothing but whitespace are counted and logged."""
    import rlhf.generation

    decode = rlhf.generation.decode_responses

    def first_answer_blank(tokenizer, response_ids):
        return [" \n"] + decode(tokenizer, response_ids)[1:]

    monkeypatch.setattr(rlhf.generation, "decode_responses", first_answer_blank)  # the monitor's decoding only
    out = tmp_path / "run"
    metrics = run_ppo(ppo_config(tiny_model_dir, out, max_steps=1, eval_steps=1,
                                 eval_dataset_name="sample:prompts_test", eval_max_prompts=3),
                      scorer=TokenCountScorer(REWARDED))
    assert [p["empty"] for p in metrics["monitor"]] == [1, 1]
    logged = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "monitor/empty" in r]
    assert logged and all(r["monitor/empty"] == 1 for r in logged)
