"""Preference layouts -> one pair form; held-out split by prompt."""

import json

import pytest

from rlhf.errors import DataError
from rlhf.pairs import PreferencePair, detect_layout, load_pairs, normalize_rows, parse_dialogue, split_by_prompt
from rlhf.testing import write_jsonl

Q1, Q2 = "What is the capital of France?", "Name a primary colour."
A1_GOOD, A1_BAD = "Paris.", "London, probably."
A2_GOOD, A2_BAD = "Red.", "I am not sure."
EXPECTED = [
    PreferencePair(({"role": "user", "content": Q1},), A1_GOOD, A1_BAD, None),
    PreferencePair(({"role": "user", "content": Q2},), A2_GOOD, A2_BAD, None),
]
EXAMPLES = [(Q1, A1_GOOD, A1_BAD), (Q2, A2_GOOD, A2_BAD)]


def _user(q):
    return [{"role": "user", "content": q}]


def _assistant(a):
    return [{"role": "assistant", "content": a}]


LAYOUTS = {
    # our export: strings plus provenance columns
    "export": [
        {"prompt": q, "chosen": c, "rejected": r, "annotator": "ann", "comparison_id": i, "created_at": "2024-01-01"}
        for i, (q, c, r) in enumerate(EXAMPLES)
    ],
    # TRL explicit prompt, conversational
    "trl_explicit": [{"prompt": _user(q), "chosen": _assistant(c), "rejected": _assistant(r)} for q, c, r in EXAMPLES],
    # HH-RLHF implicit prompt
    "hh": [
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
        for q, c, r in EXAMPLES
    ],
    # UltraFeedback-binarized: message lists without prompt
    "ultrafeedback": [
        {"chosen": _user(q) + _assistant(c), "rejected": _user(q) + _assistant(r), "score_chosen": 8.0}
        for q, c, r in EXAMPLES
    ],
    # UltraFeedback-binarized with its redundant string prompt column
    "ultrafeedback_with_prompt": [
        {"prompt": q, "chosen": _user(q) + _assistant(c), "rejected": _user(q) + _assistant(r)} for q, c, r in EXAMPLES
    ],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_loads_to_the_same_pairs(tmp_path, layout):
    path = write_jsonl(tmp_path / f"{layout}.jsonl", LAYOUTS[layout])
    assert load_pairs(str(path)) == EXPECTED


def test_layout_detection():
    assert detect_layout(["prompt", "chosen", "rejected", "annotator"]) == "explicit"
    assert detect_layout(["chosen", "rejected"], {"chosen": "\n\nHuman: a\n\nAssistant: b"}) == "dialogue"
    assert detect_layout(["chosen", "rejected"], {"chosen": _user("a") + _assistant("b")}) == "conversation"


def test_margin_column_is_kept_and_missing_values_are_none(tmp_path):
    rows = [dict(LAYOUTS["export"][0], margin=1.5), dict(LAYOUTS["export"][1], margin=None)]
    pairs = load_pairs(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert [p.margin for p in pairs] == [1.5, None]


def test_multi_turn_dialogue_prompt_is_the_shared_prefix():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Italy?\n\nAssistant: Rome."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Italy?\n\nAssistant: Milan, I think."
    (pair,) = normalize_rows([{"chosen": chosen, "rejected": rejected}], ["chosen", "rejected"])
    assert pair.prompt_messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of Italy?"},
    ]
    assert (pair.chosen, pair.rejected) == ("Rome.", "Milan, I think.")
    # responses that start alike still split at the last shared Assistant mark
    (pair,) = normalize_rows(
        [
            {
                "chosen": "\n\nHuman: q\n\nAssistant: The answer is 4.",
                "rejected": "\n\nHuman: q\n\nAssistant: The answer is 5.",
            }
        ],
        ["chosen", "rejected"],
    )
    assert (pair.chosen, pair.rejected) == ("The answer is 4.", "The answer is 5.")
    assert parse_dialogue("\n\nHuman: a\n\nAssistant: b") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]


def _turn(role, text):
    return {"role": role, "content": text}


@pytest.mark.parametrize("prompt, chosen_before", [
    ([_turn("user", "q1")], [_turn("user", "q1"), _turn("assistant", "a1"), _turn("user", "q2")]),  # repeats it all
    ([_turn("user", "q1")], [_turn("assistant", "a1"), _turn("user", "q2")]),  # continues it
    ([_turn("user", "q1"), _turn("assistant", "a1"), _turn("user", "q2")], [_turn("assistant", "a1"),
                                                                            _turn("user", "q2")]),  # repeats its end
])  # fmt: skip
def test_explicit_prompt_and_the_turns_the_answers_repeat_give_one_conversation(prompt, chosen_before):
    row = {"prompt": prompt, "chosen": [*chosen_before, _turn("assistant", "good")],
           "rejected": [*chosen_before, _turn("assistant", "bad")]}  # fmt: skip
    (pair,) = normalize_rows([row], ["prompt", "chosen", "rejected"])
    assert pair.prompt_messages == [_turn("user", "q1"), _turn("assistant", "a1"), _turn("user", "q2")]
    assert (pair.chosen, pair.rejected) == ("good", "bad")


def test_a_system_message_only_the_prompt_has_is_kept_once():
    system, question = _turn("system", "Be brief."), _turn("user", "q")
    row = {"prompt": [system, question], "chosen": [question, _turn("assistant", "good")],
           "rejected": [question, _turn("assistant", "bad")]}  # fmt: skip
    (pair,) = normalize_rows([row], ["prompt", "chosen", "rejected"])
    assert pair.prompt_messages == [system, question]


def test_missing_columns_are_named(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"missing: chosen.*it has: prompt, answer, rejected"):
        load_pairs(str(path))
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"question": "q", "good": "a"}])
    with pytest.raises(DataError, match="missing: chosen, rejected"):
        load_pairs(str(path))


def test_malformed_values_name_row_and_column():
    cols = ["prompt", "chosen", "rejected"]
    with pytest.raises(DataError, match=r"row 1: column 'rejected' is empty"):
        normalize_rows(
            [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": None}], cols
        )
    with pytest.raises(DataError, match="column 'chosen': the last message must have role 'assistant'"):
        normalize_rows([{"prompt": "q", "chosen": _user("a"), "rejected": _assistant("b")}], cols)
    with pytest.raises(DataError, match="margin"):
        normalize_rows([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}], cols + ["margin"])
    with pytest.raises(DataError, match="share every turn but the last"):
        normalize_rows(
            [{"chosen": _user("x") + _assistant("a"), "rejected": _user("y") + _assistant("b")}], ["chosen", "rejected"]
        )
    with pytest.raises(DataError, match="no prefix ending"):
        normalize_rows([{"chosen": "just text", "rejected": "other text"}], ["chosen", "rejected"])


def test_split_by_prompt_holds_out_whole_prompts():
    pairs = [PreferencePair(({"role": "user", "content": f"q{i % 10}"},), f"a{i}", f"b{i}") for i in range(40)]
    train, held = split_by_prompt(pairs, 0.2, seed=3)
    held_prompts = {p.prompt_key for p in held}
    assert len(held_prompts) == 2 and len(held) == 8 and len(train) == 32
    assert not held_prompts & {p.prompt_key for p in train}
    assert split_by_prompt(pairs, 0.2, seed=3) == (train, held)  # seeded
    assert split_by_prompt(pairs, 0.0, seed=3) == (pairs, [])
    with pytest.raises(DataError, match="no training prompts"):
        split_by_prompt(pairs[:1], 0.5, seed=0)


def test_prompt_key_is_canonical():
    a = PreferencePair(({"role": "user", "content": "q"},), "x", "y")
    assert json.loads(a.prompt_key) == [["user", "q"]]
