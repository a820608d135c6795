"""``rlhf generate --best_of N --reward_model RM``: sample N answers per answer written, keep the RM's highest."""
import json

import pytest

from rlhf.config import build_config
from rlhf.errors import ConfigError, UserError
from rlhf.generate import GenerateConfig, best_of, run_generate
from rlhf.testing import write_jsonl
from test_ppo_policy import train_tiny_reward_model


def test_best_of_keeps_the_highest_scores_best_first():
    groups = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    scores = [[0.1, 0.9, 0.5, -2.0], [3.0, 3.0, 1.0, 4.0]]
    assert best_of(groups, scores, 2) == [[("b", 0.9), ("c", 0.5)], [("h", 4.0), ("e", 3.0)]]  # equal: earlier
    assert best_of(groups, scores, 1) == [[("b", 0.9)], [("h", 4.0)]]
    assert best_of(groups, scores, 4)[0] == [("b", 0.9), ("c", 0.5), ("a", 0.1), ("d", -2.0)]


@pytest.mark.parametrize("values, message", [
    ({"best_of": 0}, "'best_of' must be >= 1"),
    ({"best_of": 4}, "needs a reward_model"),
    ({"best_of": 4, "reward_model": "rm", "do_sample": False}, "needs do_sample: true"),
])
def test_best_of_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(GenerateConfig, values)


def test_generate_keeps_the_reward_models_best_of_the_same_samples(tiny_model_dir, tmp_path):
    from reward import RewardScorer

    rm = train_tiny_reward_model(tiny_model_dir, tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say something 1."}, {"prompt": "hi"},
                                                 {"prompt": "Name a river."}])  # fmt: skip
    common = {"model_name_or_path": str(tiny_model_dir), "dataset_name": str(prompts), "max_new_tokens": 6,
              "temperature": 1.0, "seed": 3}
    every = run_generate(build_config(GenerateConfig, {**common, "num_return_sequences": 8, "reward_model": str(rm),
                                                       "out": str(tmp_path / "all.jsonl")}))  # fmt: skip
    kept = run_generate(build_config(GenerateConfig, {**common, "num_return_sequences": 2, "best_of": 4,
                                                      "reward_model": str(rm), "out": str(tmp_path / "best.jsonl")}))
    assert len(every) == 24 and len(kept) == 6
    assert [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()] == kept
    scorer = RewardScorer.from_pretrained(rm)
    for i in range(3):
        pool = every[8 * i : 8 * i + 8]  # the same seed and 2 x 4 = 8 samples per prompt: the same answers
        mine = kept[2 * i : 2 * i + 2]
        assert {r["prompt"] for r in pool} == {r["prompt"] for r in mine}
        top = sorted((r["score"] for r in pool), reverse=True)[:2]
        assert [r["score"] for r in mine] == pytest.approx(top)
        assert all(r["response"] in {p["response"] for p in pool} for r in mine)
        rescored = scorer.score([r["prompt"] for r in mine], [r["response"] for r in mine])
        assert rescored == pytest.approx([r["score"] for r in mine], abs=1e-5)
    for i in range(3):  # each prompt's 8 samples score differently, so keeping the top 2 is a choice
        assert len({round(r["score"], 4) for r in every[8 * i : 8 * i + 8]}) >= 3


def test_one_best_answer_per_prompt_and_no_score_without_a_reward_model(tiny_model_dir, tmp_path):
    rm = train_tiny_reward_model(tiny_model_dir, tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say something 1."}, {"prompt": "hi"}])
    common = {"model_name_or_path": str(tiny_model_dir), "dataset_name": str(prompts), "max_new_tokens": 6,
              "temperature": 1.0, "seed": 5}
    every = run_generate(build_config(GenerateConfig, {**common, "num_return_sequences": 4, "reward_model": str(rm),
                                                       "out": str(tmp_path / "all.jsonl")}))  # fmt: skip
    best = run_generate(build_config(GenerateConfig, {**common, "best_of": 4, "reward_model": str(rm),
                                                      "out": str(tmp_path / "best.jsonl")}))  # fmt: skip
    assert [r["response"] for r in best] == [every[0]["response"], every[4]["response"]]  # each prompt's best first
    assert all(every[4 * i]["score"] == max(r["score"] for r in every[4 * i : 4 * i + 4]) for i in range(2))
    plain = run_generate(build_config(GenerateConfig, {**common, "num_return_sequences": 4,
                                                       "out": str(tmp_path / "plain.jsonl")}))  # fmt: skip
    assert all(set(r) == {"prompt", "response"} for r in plain)
    assert sorted(r["response"] for r in plain) == sorted(r["response"] for r in every)  # same samples, reordered


def test_a_bad_reward_model_stops_before_sampling_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from rlhf import generation

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the reward model")

    monkeypatch.setattr(generation, "generate_responses", no_sampling)
    (tmp_path / "rm").mkdir()
    cfg = build_config(GenerateConfig, {"model_name_or_path": str(tiny_model_dir), "best_of": 2,
                                        "reward_model": str(tmp_path / "rm"), "out": str(tmp_path / "o.jsonl")})
    with pytest.raises(UserError, match="is not a reward model written by `rlhf reward`"):
        run_generate(cfg)
    assert not (tmp_path / "o.jsonl").exists()


def test_scores_that_are_not_finite_stop_the_run_and_write_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from reward import RewardScorer

    rm = train_tiny_reward_model(tiny_model_dir, tmp_path)
    monkeypatch.setattr(RewardScorer, "score", lambda self, prompts, responses: [float("nan")] * len(responses))
    cfg = build_config(GenerateConfig, {"model_name_or_path": str(tiny_model_dir), "best_of": 2, "max_new_tokens": 4,
                                        "reward_model": str(rm), "max_prompts": 2, "out": str(tmp_path / "o.jsonl")})
    with pytest.raises(UserError, match="NaN/inf for 4 of 4 answers"):
        run_generate(cfg)
    assert not (tmp_path / "o.jsonl").exists()
