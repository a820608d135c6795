"""Active labeling: uncertainty math by hand, and the comparisons `label candidates --selection` creates."""

import json
import math

import pytest
import sqlalchemy as sa

from feedback_ui import candidates
from feedback_ui.candidates import add_candidates, add_selected_comparisons
from feedback_ui.config import LabelCandidatesConfig
from feedback_ui.selection import (
    most_uncertain,
    pair_uncertainties,
    pair_uncertainty,
    preference_probability,
    random_selection,
)
from feedback_ui.store import Comparison, Response, init_db
from rlhf.cli import main
from rlhf.config import build_config

LN3, LN9 = math.log(3), math.log(9)
POLICY = "tiny"


# the math, by hand


def test_preference_probability():
    assert preference_probability(LN3, 0.0) == pytest.approx(0.75)  # e^ln3 / (1 + e^ln3) = 3/4
    assert preference_probability(0.0, LN3) == pytest.approx(0.25)
    assert preference_probability(1000.0, 0.0) == 1.0 and preference_probability(-1000.0, 0.0) == 0.0  # no overflow


def test_single_model_uncertainty_is_closeness_to_one_half():
    assert pair_uncertainty([0.0], [0.0]) == pytest.approx(1.0)  # p = 1/2
    assert pair_uncertainty([LN3], [0.0]) == pytest.approx(0.5)  # p = 3/4: 1 - 2 * 1/4
    assert pair_uncertainty([0.0], [LN9]) == pytest.approx(0.2)  # p = 1/10: 1 - 2 * 4/10


def test_ensemble_uncertainty_is_member_disagreement():
    # p = (1/2, 3/4): mean 5/8, std = 1/8
    assert pair_uncertainty([0.0, LN3], [0.0, 0.0]) == pytest.approx(0.125)
    # p = (3/4, 1/4): std = 1/4; members agreeing (even at 1/2) give 0
    assert pair_uncertainty([LN3, -LN3], [0.0, 0.0]) == pytest.approx(0.25)
    assert pair_uncertainty([0.0, 0.0], [0.0, 0.0]) == 0.0
    # rewards (K=2, R=3) -> pairs by index
    assert pair_uncertainties([[0.0, LN3, 0.0], [0.0, -LN3, 0.0]], [(1, 0), (0, 2)]) == pytest.approx([0.25, 0.0])
    with pytest.raises(ValueError):
        pair_uncertainty([0.0], [0.0, 1.0])


def test_most_uncertain_and_random_selection():
    assert most_uncertain([0.2, 1.0, 0.5, 1.0], 2) == [1, 3]
    assert most_uncertain([0.2, 1.0, 0.5, 1.0], 3) == [1, 2, 3]
    assert most_uncertain([0.5, 0.5, 0.5], 2) == [0, 1]  # ties: earlier first
    assert most_uncertain([0.5], 4) == [0]
    picked = random_selection(10, 4, seed=7)
    assert picked == random_selection(10, 4, seed=7) and picked == sorted(set(picked)) and len(picked) == 4
    assert random_selection(10, 4, seed=8) != picked
    assert random_selection(3, 5, seed=0) == [0, 1, 2]


# the comparisons created, with a scripted scorer


class ScriptedScorer:
    """Member rewards from a table text -> [r_member_0, ...]; records what it was asked to score."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score_members(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        k = len(next(iter(self.table.values())))
        return [[self.table[t][m] for t in responses] for m in range(k)]


def store_responses(db, by_prompt):
    store = init_db(db)
    for prompt, texts in by_prompt.items():
        add_candidates(store, prompt, texts, policy=POLICY, compare=False)
    return store


def created_pairs(store):
    with store.read() as s:
        text = dict(s.execute(sa.select(Response.id, Response.text)).all())
        rows = s.scalars(sa.select(Comparison).where(~Comparison.is_gold)).all()
        return {tuple(text[i] for i in c.response_ids) for c in rows}, [c.overlap for c in rows]


def cfg_for(db, **kw):
    return build_config(LabelCandidatesConfig, {"db": db, "selection": "uncertainty", "reward_model": "rm", **kw})


def test_single_reward_model_picks_the_pairs_closest_to_one_half(db_url, monkeypatch):
    # Q1: a=0, b=ln3, c=ln9 -> (a,b) u=0.5, (a,c) u=0.2, (b,c) u=0.5
    # Q2: d=0, e=0, f=10   -> (d,e) u=1,   (d,f) and (e,f) u~1e-4
    table = {"a": [0.0], "b": [LN3], "c": [LN9], "d": [0.0], "e": [0.0], "f": [10.0]}
    scorer = ScriptedScorer(table)
    monkeypatch.setattr(candidates, "load_reward_scorer", lambda path: scorer)
    store = store_responses(db_url, {"Q1?": ["a", "b", "c"], "Q2?": ["d", "e", "f"]})
    cfg = cfg_for(db_url, label_budget=3, overlap=2)
    summary = add_selected_comparisons(store, ["Q1?", "Q2?"], POLICY, cfg)
    pairs, overlaps = created_pairs(store)  # SQLite and PostgreSQL
    assert pairs == {("d", "e"), ("a", "b"), ("b", "c")}
    assert summary == {"candidate_comparisons": 6, "already_selected": 0, "selected": 3} and overlaps == [2, 2, 2]
    # every response scored once, with its own prompt
    (prompts, texts), = scorer.calls
    assert sorted(texts) == list("abcdef")
    assert [p[0]["content"] for p in prompts] == ["Q1?"] * 3 + ["Q2?"] * 3
    # a re-run with the same budget adds nothing; a larger one adds the next most uncertain pair
    assert add_selected_comparisons(store, ["Q1?", "Q2?"], POLICY, cfg)["selected"] == 0
    add_selected_comparisons(store, ["Q1?", "Q2?"], POLICY, cfg_for(cfg.db, label_budget=4))
    assert created_pairs(store)[0] == pairs | {("a", "c")}


def test_ensemble_picks_the_pairs_its_members_disagree_on(tmp_path, monkeypatch):
    # x, y: both members 0 -> (x,y): p = (1/2, 1/2), std 0 although 50%
    # z: member 0 ln3, member 1 -ln3 -> (x,z), (y,z): p = (1/4, 3/4), std 1/4
    table = {"x": [0.0, 0.0], "y": [0.0, 0.0], "z": [LN3, -LN3]}
    monkeypatch.setattr(candidates, "load_reward_scorer", lambda path: ScriptedScorer(table))
    store = store_responses(str(tmp_path / "l.db"), {"Q?": ["x", "y", "z"]})
    add_selected_comparisons(store, ["Q?"], POLICY, cfg_for(str(tmp_path / "l.db"), label_budget=2))
    assert created_pairs(store)[0] == {("x", "z"), ("y", "z")}


def test_random_selection_needs_no_reward_model(tmp_path, monkeypatch):
    monkeypatch.setattr(candidates, "load_reward_scorer", lambda path: pytest.fail("random must not score"))
    db = str(tmp_path / "l.db")
    store = store_responses(db, {"Q1?": ["a", "b", "c"], "Q2?": ["d", "e", "f"]})
    cfg = build_config(LabelCandidatesConfig, {"db": db, "selection": "random", "label_budget": 4, "seed": 3})
    assert add_selected_comparisons(store, ["Q1?", "Q2?"], POLICY, cfg)["selected"] == 4
    again = store_responses(str(tmp_path / "m.db"), {"Q1?": ["a", "b", "c"], "Q2?": ["d", "e", "f"]})
    add_selected_comparisons(again, ["Q1?", "Q2?"], POLICY, cfg)
    assert created_pairs(again)[0] == created_pairs(store)[0]  # seeded


# the command, on the tiny model


def test_candidates_command_with_a_budget(tmp_path, tiny_model_dir, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say hi.", "Name a colour.", "Count."]))
    db = str(tmp_path / "c.db")
    args = ["label", "candidates", "--db", db, "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts),
            "--num_candidates", "3", "--max_new_tokens", "6", "--temperature", "1.5", "--batch_size", "4"]  # fmt: skip
    assert main([*args, "--selection", "random", "--label_budget", "2"]) == 0
    assert "selection random: 2 comparisons created" in capsys.readouterr().out
    store = init_db(db)
    assert len(created_pairs(store)[0]) == 2
    assert main([*args, "--selection", "random", "--label_budget", "2"]) == 0  # re-run: budget already met
    assert "0 new responses, 0 new comparisons" in capsys.readouterr().out

    # uncertainty over the same responses: the RM's most uncertain pairs among those not created yet
    def reward(text):
        return [len(text) / 3.0]

    monkeypatch.setattr(candidates, "check_reward_model", lambda path: None)
    monkeypatch.setattr(candidates, "load_reward_scorer", lambda path: ScriptedScorer({}))
    monkeypatch.setattr(ScriptedScorer, "score_members", lambda self, p, r: [[reward(t)[0] for t in r]])
    before, _ = created_pairs(store)
    pool, _ = candidates.candidate_pool(store, [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()],
                                        tiny_model_dir, "pairwise")  # fmt: skip
    assert main([*args, "--selection", "uncertainty", "--reward_model", "rm", "--label_budget", "4"]) == 0
    after, _ = created_pairs(store)
    new = after - before
    scores = {c.texts: pair_uncertainty(reward(c.texts[0]), reward(c.texts[1])) for c in pool}
    assert len(new) == min(2, len(pool))
    assert min(scores[p] for p in new) >= max([s for t, s in scores.items() if t not in new], default=0.0)
