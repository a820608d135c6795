"""Length-controlled evaluation: win rates on pairs of about equal length, and mean words per side."""

import json

import pytest

from rlhf import evaluate
from rlhf.config import build_config
from rlhf.errors import ConfigError
from rlhf.evaluate import (
    EvalConfig,
    format_length_controlled,
    length_controlled,
    length_gap,
    length_matched,
    run_eval,
    unchanged,
    word_count,
)
from rlhf.testing import write_jsonl


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_word_count_splits_on_any_whitespace():
    assert word_count("The cat sat.") == 3
    assert word_count("  a  b\n\tc ") == 3
    assert word_count("") == 0 and word_count("   ") == 0


def test_length_gap_is_relative_to_the_longer_answer():
    assert length_gap(10, 8) == pytest.approx(0.2)  # 2 / 10
    assert length_gap(8, 10) == pytest.approx(0.2)  # symmetric
    assert length_gap(20, 17) == pytest.approx(0.15)  # 3 / 20
    assert length_gap(0, 5) == 1.0  # 5 / 5
    assert length_gap(0, 0) == 0.0  # two empty answers have the same length


def test_length_matched_is_a_strict_bound():
    pairs = [(10, 8), (20, 17), (0, 0), (0, 5), (9, 10)]  # gaps 0.2, 0.15, 0, 1, 0.1
    assert length_matched(pairs, 0.2) == [1, 2, 4]  # 0.2 itself is not < 0.2
    assert length_matched(pairs, 0.21) == [0, 1, 2, 4]
    assert length_matched(pairs, 0.1) == [2]
    assert length_matched(pairs, 1.0) == [0, 1, 2, 4]  # one empty answer against a non-empty one never matches
    assert length_matched([], 0.2) == []


def test_length_controlled_hand_computed():
    # word counts (policy, baseline) and gaps: (10, 8) 0.2 out, (20, 17) 0.15 in, (4, 4) 0 in,
    # (6, 2) 0.667 out, (9, 10) 0.1 in
    policy = [words(10), words(20), words(4), words(6), words(9)]
    baseline = [words(8), words(17), "a  b\nc d", words(2), words(10)]
    length_judge = ([10, 20, 4, 6, 9], [8, 17, 4, 2, 10])  # a judge that only counts words
    rule_judge = ([0, 0.9, 0.5, 0, 0.8], [1, 0.2, 0.4, 1, 0.1])
    lc = length_controlled(policy, baseline, {"reward_model": length_judge, "rule": rule_judge}, 0.2)
    assert lc["unit"] == "words" and lc["tolerance"] == 0.2
    assert lc["n_pairs"] == 5 and lc["n_matched"] == 3
    # all pairs: policy (10+20+4+6+9)/5 = 9.8, baseline (8+17+4+2+10)/5 = 8.2; matched: 33/3 = 11, 31/3 = 10.333
    assert lc["policy_mean_words"] == pytest.approx(9.8)
    assert lc["baseline_mean_words"] == pytest.approx(8.2)
    assert lc["matched_policy_mean_words"] == pytest.approx(11.0)
    assert lc["matched_baseline_mean_words"] == pytest.approx(31 / 3)
    # the length judge wins 3, ties 1, loses 1 of all pairs (0.7) but only 1 / 1 / 1 of the matched ones:
    # p = 1.5 / 3 = 0.5; Wilson n=3: denom = 1 + 3.8416/3 = 2.280533, centre 0.5,
    # half = 1.96 * sqrt(0.25/3 + 3.8416/36) / denom = 1.96 * 0.435941 / 2.280533 = 0.374668
    rm = lc["reward_model"]
    assert (rm["wins"], rm["ties"], rm["losses"], rm["n"]) == (1, 1, 1, 3)
    assert rm["win_rate"] == 0.5
    assert rm["ci_low"] == pytest.approx(0.125332, abs=1e-5) and rm["ci_high"] == pytest.approx(0.874668, abs=1e-5)
    # the rule wins all 3 matched pairs: centre = (1 + 3.8416/6) / denom = 1.640267 / 2.280533,
    # half = 1.96 * (1.96/6) / denom = 0.640267 / 2.280533 -> low = 1 / 2.280533 = 0.438494, high = 1
    rule = lc["rule"]
    assert (rule["wins"], rule["ties"], rule["losses"], rule["n"]) == (3, 0, 0, 3)
    assert rule["win_rate"] == 1.0
    assert rule["ci_low"] == pytest.approx(0.438494, abs=1e-5) and rule["ci_high"] == 1.0


def test_length_controlled_without_matched_pairs():
    lc = length_controlled([words(1), words(10)], [words(5), words(2)], {"rule": ([1, 1], [0, 0])}, 0.2)
    assert lc["n_matched"] == 0 and lc["rule"] == {"n": 0, "win_rate": None}
    assert lc["policy_mean_words"] == 5.5 and lc["baseline_mean_words"] == 3.5
    assert lc["matched_policy_mean_words"] is None and lc["matched_baseline_mean_words"] is None
    assert "no pair within the tolerance" in format_length_controlled(lc)
    with pytest.raises(ValueError):
        length_controlled([words(1)], [words(1), words(2)], {}, 0.2)  # unpaired texts


def test_format_names_tolerance_counts_and_interval():
    lc = length_controlled([words(20), words(4)], [words(17), words(4)], {"rule": ([1, 0], [0, 0])}, 0.2)
    text = format_length_controlled(lc)
    # both pairs matched; rule: 1 win + 1 tie of 2 -> 0.75
    assert "< 0.2" in text and "2 of 2 pairs" in text and "12.0 vs baseline 10.5" in text
    assert "under rule: 0.750 [" in text and "(n=2)" in text


def test_length_tolerance_is_validated():
    values = {"policy": "p", "baseline": "b", "rule": "x"}
    assert build_config(EvalConfig, values).length_tolerance == 0.2
    assert build_config(EvalConfig, {**values, "length_tolerance": "0.5"}).length_tolerance == 0.5
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="length_tolerance"):
            build_config(EvalConfig, {**values, "length_tolerance": bad})


def test_eval_writes_and_prints_the_length_controlled_block(tiny_model_dir, tmp_path, monkeypatch, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}, {"prompt": "why?"}])
    monkeypatch.setattr(evaluate, "load_rule", lambda name: lambda prompt, response: float(len(response)))
    cfg = build_config(EvalConfig, {
        "policy": tiny_model_dir, "baseline": tiny_model_dir, "dataset_name": str(prompts), "rule": "x",
        "out_dir": str(tmp_path / "eval"), "max_new_tokens": 5, "length_tolerance": 0.3,
    })
    run_eval(cfg)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    lc = saved["length_controlled"]
    # the same model answers greedily twice: every pair has equal lengths and ties under the rule
    assert lc["tolerance"] == 0.3 and lc["n_pairs"] == 3 and lc["n_matched"] == 3
    assert lc["rule"]["ties"] == 3 and lc["rule"]["win_rate"] == 0.5
    assert "reward_model" not in lc  # no reward model given
    expected_words = sum(len(s["policy"].split()) for s in saved["samples"]) / 3
    assert lc["policy_mean_words"] == pytest.approx(expected_words)
    assert lc["policy_mean_words"] == lc["baseline_mean_words"]
    err = capsys.readouterr().err
    assert "length-controlled (pairs with |words_a - words_b| / max < 0.3): 3 of 3 pairs" in err
    assert "length-matched win rate under rule: 0.500" in err


def test_unchanged_counts_answers_that_are_the_baselines_word_for_word():
    # pairs 1 and 2 are the same text (2 up to surrounding whitespace); 3 differs by one word, 4 by case
    policy = ["The sky is blue.", " Paris.\n", "The sky is very blue.", "paris."]
    baseline = ["The sky is blue.", "Paris.", "The sky is blue.", "Paris."]
    assert unchanged(policy, baseline) == 2
    with pytest.raises(ValueError, match="3 policy answers for 4"):
        unchanged(policy[:3], baseline)
