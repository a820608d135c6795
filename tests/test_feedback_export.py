"""Export strategies, the prompt split, stats and the ``rlhf label`` commands."""

import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from feedback_ui import tasks
from feedback_ui.export import export_preferences, held_out_path
from feedback_ui.stats import collect_stats, format_stats
from feedback_ui.store import Assignment, Comparison, Prompt, Response, get_setting, open_store
from feedback_ui.testing import PASSWORD, make_project
from rlhf.cli import main
from rlhf.errors import UserError


def label_with(store, name, decide, gold_rate=0.0):
    """Answer every task of ``name``; ``decide(prompt)`` gives a canonical answer:
    an index into the comparison's stored order (0 = first stored response), 'tie', 'both_bad',
    ('much'|'slightly', index), or a list of indices (ranking). Returns the answers sent, in order."""
    sent = []
    view = tasks.serve(store, name, gold_rate)
    while view["token"]:
        with store.read() as s:
            a = s.scalar(sa.select(Assignment).where(Assignment.token == view["token"]))
            ids = s.get(Comparison, a.comparison_id).response_ids
        answer, strength = decide(view["prompt"]), None
        if isinstance(answer, tuple):
            strength, answer = answer
        if isinstance(answer, list):
            kwargs = {"positions": [a.order.index(ids[i]) for i in answer]}
        elif isinstance(answer, int):
            kwargs = {"choice": "AB"[a.order.index(ids[answer])], "strength": strength}
        else:
            kwargs = {"choice": answer}
        sent.append(kwargs)
        view = tasks.answer(store, name, view["token"], gold_rate, **kwargs)
    return sent


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def voted(db_url, tmp_path):
    """3 labelers on 3 pairs + one 3-way ranking (overlap 3) and one gold item (on SQLite and PostgreSQL)."""
    store = make_project(db_url, {"ann": "labeler", "bob": "labeler", "cy": "labeler"},
                         n_pairs=3, n_rank=1, overlap=3, n_gold=1)  # fmt: skip
    plan = {
        "ann": {"pair prompt 0": ("much", 0), "pair prompt 1": "tie", "pair prompt 2": "both_bad"},
        "bob": {"pair prompt 0": ("slightly", 0), "pair prompt 1": "tie", "pair prompt 2": 0},
        "cy": {"pair prompt 0": 1, "pair prompt 1": 0, "pair prompt 2": 1},
    }
    for name, answers in plan.items():
        # gold_rate 0.99: the gold item comes first while regular work remains
        label_with(store, name, lambda p, a=answers: a.get(p, [0, 1, 2]) if not p.startswith("gold") else 1, 0.99)
    return store, tmp_path


def test_export_majority_default(voted):
    store, tmp = voted
    counts = export_preferences(store, str(tmp / "prefs.jsonl"))
    rows = read_jsonl(tmp / "prefs.jsonl")
    assert counts["rows"] == len(rows) == 4  # prompt 0 (2 of 3) + 3 ranking pairs; tie/no-majority/gold dropped
    pair = next(r for r in rows if r["prompt"] == "pair prompt 0")
    assert (pair["chosen"], pair["rejected"]) == ("answer 0.a", "answer 0.b")
    assert pair["margin"] == 2.0  # mean of much (3.0) and slightly (1.0)
    assert pair["annotator"] == "ann,bob" and pair["n_votes"] == 3 and pair["outcome"] == "ranked"
    assert pair["created_at"].endswith("Z") and isinstance(pair["comparison_id"], int)
    ranked = [(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == "rank prompt 0"]
    assert ranked == [("ranked answer 0.0", "ranked answer 0.1"), ("ranked answer 0.0", "ranked answer 0.2"),
                      ("ranked answer 0.1", "ranked answer 0.2")]  # fmt: skip
    assert not any("gold" in r["prompt"] for r in rows)
    assert all(isinstance(r[k], str) for r in rows for k in ("prompt", "chosen", "rejected"))


def test_export_strategies_and_options(voted):
    store, tmp = voted
    out = str(tmp / "p.jsonl")
    assert export_preferences(store, out, aggregate="all")["rows"] == 3 + 1 + 2 + 9  # every decisive vote
    assert {r["annotator"] for r in read_jsonl(out)} == {"ann", "bob", "cy"}
    assert export_preferences(store, out, strategy="best-vs-rest")["rows"] == 1 + 2
    assert export_preferences(store, out, keep=["tie"])["rows"] == 4 + 2  # a tie is written once each way round
    tie = next(r for r in read_jsonl(out) if r["outcome"] == "tie")
    assert tie["prompt"] == "pair prompt 1" and tie["annotator"] == "ann,bob" and tie["margin"] == 0.0
    assert export_preferences(store, out, aggregate="all", keep=["tie", "both_bad"])["rows"] == 15 + 2 * (2 + 1)
    assert export_preferences(store, out, margin_much=5.0, margin_slightly=1.0)["rows"] == 4
    assert next(r for r in read_jsonl(out) if r["prompt"] == "pair prompt 0")["margin"] == 3.0
    with pytest.raises(UserError, match="--keep"):
        export_preferences(store, out, keep=["maybe"])


def test_export_split_by_prompt(voted):
    store, tmp = voted
    counts = export_preferences(store, str(tmp / "prefs.jsonl"), aggregate="all", test_fraction=0.5, seed=3)
    assert held_out_path(tmp / "prefs.jsonl") == tmp / "prefs.test.jsonl" == Path(counts["test_out"])
    train, test = read_jsonl(tmp / "prefs.jsonl"), read_jsonl(tmp / "prefs.test.jsonl")
    assert len(train) + len(test) == 15 and train and test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in test}) == 2  # round(4 prompts * 0.5)


def test_kept_ties_and_both_bad_prefer_neither_response(voted):
    """What the reward stage reads of kept ties and both-bads: as many rows for each side, all with margin 0."""
    from collections import Counter

    from rlhf.pairs import load_pairs

    store, tmp = voted
    plain, kept = str(tmp / "plain.jsonl"), str(tmp / "kept.jsonl")
    export_preferences(store, plain, aggregate="all")
    export_preferences(store, kept, aggregate="all", keep=["tie", "both_bad"])
    def seen(path):  # (prompt, chosen, rejected, margin) as the reward stage reads them
        return Counter((p.prompt_key, p.chosen, p.rejected, p.margin) for p in load_pairs(path))

    added = seen(kept) - seen(plain)  # the rows --keep adds
    assert sum(added.values()) == 2 * (2 + 1)  # two ties and one both-bad, each once each way round
    assert {margin for *_, margin in added} == {0.0}
    for (prompt, chosen, rejected, margin), n in added.items():
        assert added[prompt, rejected, chosen, margin] == n  # as often the other way round
    rows = read_jsonl(kept)
    assert sorted(r["outcome"] for r in rows if r["outcome"] != "ranked") == ["both_bad"] * 2 + ["tie"] * 4


def test_an_export_without_a_split_removes_the_earlier_held_out_file(voted, capsys):
    store, tmp = voted
    out = tmp / "prefs.jsonl"
    export_preferences(store, str(out), aggregate="all", test_fraction=0.5)
    assert held_out_path(out).is_file()
    counts = export_preferences(store, str(out), aggregate="all")
    assert not held_out_path(out).exists() and counts["removed"] == str(held_out_path(out))
    assert len(read_jsonl(out)) == 15  # every prompt is in the training file now
    export_preferences(store, str(out), aggregate="all", test_fraction=0.5)
    assert main(["label", "export", "--db", store.url, "--out", str(out), "--aggregate", "all"]) == 0
    assert "removed the held-out file of an earlier export" in capsys.readouterr().out
    assert not held_out_path(out).exists()
    counts = export_preferences(store, str(out), aggregate="all")  # nothing to remove: nothing said
    assert "removed" not in counts


def test_export_includes_edits(db_url, tmp_path):
    store = make_project(db_url, {"ann": "labeler"}, n_pairs=1)
    view = tasks.serve(store, "ann", 0.0)
    tasks.answer(store, "ann", view["token"], 0.0, choice="A", edit="an edited answer")
    export_preferences(store, str(tmp_path / "p.jsonl"))
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert len(rows) == 3
    assert {(r["chosen"] == "an edited answer") for r in rows} == {True, False}
    assert sum(r["chosen"] == "an edited answer" for r in rows) == 2


def test_stats_against_hand_computed_agreement(db_url):
    store = make_project(db_url, {"ann": "labeler", "bob": "admin"}, n_pairs=10, overlap=2, n_gold=2)
    ann, bob = "0000001111", "0000111110"  # index of the better response per prompt (see the math test)
    sent = label_with(store, "ann", lambda p: 1 if p.startswith("gold") else int(ann[int(p.split()[-1])]), 0.99)
    label_with(store, "bob", lambda p: (1 if p.endswith("0") else 0) if p.startswith("gold") else
               int(bob[int(p.split()[-1])]), 0.99)  # fmt: skip
    s = collect_stats(store)
    a = s["agreement"]
    assert a["overlapping_items"] == 10
    assert a["cohen_kappa"] == pytest.approx(0.4, abs=1e-3)  # p_o 0.7, p_e 0.5
    # 2 labelers x 10 items: o_00 = 8, o_11 = 6, o_01 = o_10 = 3; n_0 = 11, n_1 = 9, n = 20
    # alpha = 1 - 19 * 6 / (2 * 11 * 9) = 1 - 114/198 = 0.424
    assert a["krippendorff_alpha"] == pytest.approx(0.424, abs=1e-3)
    assert a["percent_agreement"] == pytest.approx(0.7)
    by = {u["name"]: u for u in s["labelers"]}
    assert by["ann"]["done"] == 12 and by["ann"]["gold_items"] == 2
    # gold: the better response is the stored-first one ('good answer'), index 0; ann always picked index 1
    assert by["ann"]["gold_accuracy"] == 0.0 and by["bob"]["gold_accuracy"] == 0.5
    assert by["ann"]["agreement"] == 0.7
    # every one of ann's 12 answers is decisive: the rate is the share of them sent as "A"
    assert by["ann"]["side_a_rate"] == pytest.approx(sum(k["choice"] == "A" for k in sent) / 12, abs=1e-3)
    assert by["ann"]["median_seconds"] is not None
    assert s["counts"]["comparisons_complete"] == 10 and s["counts"]["gold_items"] == 2
    text = format_stats(s)
    assert "Cohen's kappa 0.4" in text and "ann" in text


# commands


def test_label_commands(db_url, tmp_path, monkeypatch, capsys):
    db = db_url
    assert main(["label", "stats", "--db", db]) == 2
    assert "not initialised" in capsys.readouterr().err
    assert main(["label", "init", "--db", db]) == 0
    monkeypatch.setenv("RLHF_PASSWORD", PASSWORD)
    assert main(["label", "user", "add", "ann", "--db", db]) == 0
    assert main(["label", "user", "add", "ann", "--db", db]) == 2
    assert "already exists" in capsys.readouterr().err
    monkeypatch.delenv("RLHF_PASSWORD")
    monkeypatch.setattr("sys.stdin", io.StringIO("another password\n"))
    assert main(["label", "user", "add", "root", "--role", "admin", "--db", db]) == 0
    capsys.readouterr()
    assert main(["label", "user", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert "ann\tlabeler" in listing and "root\tadmin" in listing and PASSWORD not in listing
    assert "disabled" not in listing
    assert main(["label", "user", "disable", "ann", "--db", db]) == 0
    capsys.readouterr()
    assert main(["label", "user", "list", "--db", db]) == 0
    assert [line.endswith("\tdisabled") for line in capsys.readouterr().out.splitlines()] == [True, False]
    assert main(["label", "user", "enable", "ann", "--db", db]) == 0
    capsys.readouterr()
    assert main(["label", "stats", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["users"] == 2
    assert main(["label", "export", "--db", db, "--out", str(tmp_path / "p.jsonl"), "--test_fraction", "0.2"]) == 0
    out, err = capsys.readouterr()
    assert "p.test.jsonl" in out and "no comparison has been answered yet" in err
    assert main(["label", "export", "--db", db, "--strategy", "nope"]) == 2
    assert main(["label", "candidates", "--db", db, "--num_candidates", "1"]) == 2
    assert "num_candidates" in capsys.readouterr().err
    assert main(["label", "candidates", "--mode", "ranking", "--num_candidates", "2"]) == 2
    assert main(["label", "candidates", "--no_such_key", "1"]) == 2


def test_candidates_on_tiny_model(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = ["Say hi.", "Name a colour.", [{"role": "user", "content": "Count to 3."}]]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    db = str(tmp_path / "c.db")
    args = ["label", "candidates", "--db", db, "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts),
            "--num_candidates", "3", "--max_new_tokens", "6", "--temperature", "1.5", "--batch_size", "2",
            "--overlap", "2", "--gold_file", str(gold), "--gold_rate", "0.1"]  # fmt: skip
    assert main(args) == 0
    store = open_store(db)
    with store.read() as s:
        policy = s.scalars(sa.select(Response).where(Response.source == "policy")).all()
        comparisons = s.scalars(sa.select(Comparison).where(~Comparison.is_gold)).all()
        assert s.scalar(sa.select(sa.func.count()).select_from(Prompt)) == 4
        assert s.scalar(sa.select(sa.func.count()).select_from(Comparison).where(Comparison.is_gold)) == 1
    assert 3 * 2 <= len(policy) <= 9  # duplicates of a prompt's samples are stored once
    assert {r.policy for r in policy} == {tiny_model_dir}
    assert policy[0].settings["max_new_tokens"] == 6 and policy[0].settings["temperature"] == 1.5
    assert all(c.kind == "pair" and c.overlap == 2 for c in comparisons) and len(comparisons) >= 3
    with store.read() as s:
        assert get_setting(s, "gold_rate") == 0.1
    # re-running adds nothing
    assert main(args) == 0
    assert "0 new responses, 0 new comparisons, 0 new gold" in capsys.readouterr().out
    with store.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Response)) == len(policy) + 2
    # ranking mode over the same responses: one K-wise comparison per prompt with >= 3 distinct responses
    assert main(args + ["--mode", "ranking"]) == 0
    with store.read() as s:
        ranks = s.scalars(sa.select(Comparison).where(Comparison.kind == "rank")).all()
    assert all(len(c.response_ids) >= 3 for c in ranks)


@pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)
def test_export_loads_in_trl_reward_trainer(voted, tiny_model_dir):
    import datasets
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.pairs import load_pairs

    store, tmp = voted
    export_preferences(store, str(tmp / "prefs.jsonl"), aggregate="all")
    assert len(load_pairs(str(tmp / "prefs.jsonl"))) == 15
    ds = datasets.load_dataset("json", data_files=str(tmp / "prefs.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = trl.RewardConfig(output_dir=str(tmp / "rm"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                            save_strategy="no", logging_steps=1, use_cpu=True)  # fmt: skip
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    assert trainer.train().global_step == 1


def test_the_pipeline_prefs_section_takes_the_export_flags_names():
    import dataclasses

    from feedback_ui.config import LabelExportConfig
    from rlhf.cli import build_parser

    export = build_parser()._subparsers._group_actions[0].choices["label"]
    export = export._subparsers._group_actions[0].choices["export"]
    flags = {a.dest for a in export._actions} - {"help", "db", "out"}
    assert flags == {f.name for f in dataclasses.fields(LabelExportConfig)}


def test_a_multi_turn_prompt_is_exported_as_its_messages_and_read_back_as_the_policy_sees_it(db_url, tmp_path):
    from feedback_ui.candidates import add_candidates
    from rlhf.pairs import load_pairs

    store = make_project(db_url, {"ann": "labeler"}, n_pairs=1)
    talk = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}]
    add_candidates(store, talk, ["Bonjour.", "Hello."], policy="fixture")
    label_with(store, "ann", lambda prompt: 0)  # the first stored response wins everywhere
    out = tmp_path / "prefs.jsonl"
    export_preferences(store, str(out))
    rows = read_jsonl(out)
    assert len(rows) == 2 and all(isinstance(r["prompt"], list) for r in rows)  # one file, one form: messages
    mine = next(r for r in rows if r["prompt"][0]["role"] == "system")
    assert mine["prompt"] == talk and mine["chosen"] == [{"role": "assistant", "content": "Bonjour."}]
    read = {p.prompt_messages[0]["content"]: p for p in load_pairs(str(out))}
    assert read["Answer in French."].prompt_messages == talk and read["Answer in French."].chosen == "Bonjour."
    assert read["pair prompt 0"].prompt_messages == [{"role": "user", "content": "pair prompt 0"}]
