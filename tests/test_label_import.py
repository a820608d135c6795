"""``rlhf label import``: outside responses -> comparisons between models, additive, on SQLite and PostgreSQL."""

import sqlalchemy as sa
from test_cli import heavy_modules_after

from feedback_ui import tasks
from feedback_ui.auth import add_user
from feedback_ui.imports import import_responses, read_responses
from feedback_ui.store import Comparison, Prompt, Response, init_db
from feedback_ui.testing import PASSWORD
from rlhf.cli import main
from rlhf.testing import write_jsonl

ROWS = [
    {"prompt": "Capital of France?", "response": "Paris.", "model": "base"},
    {"prompt": "Capital of France?", "response": "It is Paris.", "model": "sft"},
    {"prompt": [{"role": "user", "content": "Capital of France?"}], "response": "Paris!", "model": "ppo"},
    {"prompt": "Capital of France?", "response": "Lyon?", "model": "base"},  # a 2nd response of one model
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "response": "4", "model": "base"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "response": "Four.", "model": "sft"},
    {"prompt": "Only one model here", "response": "alone", "model": "base"},
]  # fmt: skip


def comparisons(store):
    """(prompt text, kind, sorted models of the responses) of every comparison."""
    with store.read() as s:
        model = dict(s.execute(sa.select(Response.id, Response.policy)).all())
        rows = s.execute(sa.select(Prompt.text, Comparison.kind, Comparison.response_ids, Comparison.overlap)
                         .join(Prompt, Prompt.id == Comparison.prompt_id)).all()  # fmt: skip
    return sorted((text, kind, tuple(sorted(model[i] for i in ids)), overlap) for text, kind, ids, overlap in rows)


def test_pairs_of_different_models_and_reimport_adds_only_what_is_new(db_url, tmp_path):
    store = init_db(db_url)
    counts = import_responses(store, read_responses(write_jsonl(tmp_path / "r.jsonl", ROWS)), overlap=2)
    assert counts == {"rows": 7, "prompts": 3, "new_responses": 7, "new_comparisons": 6, "one_model": 1,
                      "too_many": 0}  # fmt: skip
    france = "Capital of France?"  # a string prompt and the same single user message are one prompt
    two = "system: Be brief.\n\nuser: 2+2?"
    assert comparisons(store) == sorted(
        [(france, "pair", ("base", "ppo"), 2)] * 2 + [(france, "pair", ("base", "sft"), 2)] * 2
        + [(france, "pair", ("ppo", "sft"), 2), (two, "pair", ("base", "sft"), 2)]
    )  # never base against base
    again = import_responses(store, read_responses(str(tmp_path / "r.jsonl")), overlap=2)
    assert (again["new_responses"], again["new_comparisons"]) == (0, 0)
    assert len(comparisons(store)) == 6

    more = [*ROWS, {"prompt": "Only one model here", "response": "not alone", "model": "sft"},
            {"prompt": "2+2?", "response": "4", "model": "ppo"}]  # fmt: skip
    grown = import_responses(store, read_responses(write_jsonl(tmp_path / "more.jsonl", more)), overlap=2)
    assert (grown["new_responses"], grown["new_comparisons"], grown["one_model"]) == (2, 1, 1)  # "2+2?" is new
    assert ("Only one model here", "pair", ("base", "sft"), 2) in comparisons(store)

    add_user(store, "ann", PASSWORD, "labeler")
    view = tasks.serve(store, "ann", 0.0)
    assert view["kind"] == "pair" and view["total"] == 7 and view["prompt"] in (france, two, "Only one model here")


def test_ranking_mode_makes_one_ranking_per_prompt(db_url, tmp_path):
    store = init_db(db_url)
    rows = read_responses(write_jsonl(tmp_path / "r.jsonl", ROWS))
    counts = import_responses(store, rows, mode="ranking")
    assert (counts["new_comparisons"], counts["one_model"]) == (2, 1)
    kinds = [(kind, len(models)) for _, kind, models, _ in comparisons(store)]
    assert sorted(kinds) == [("pair", 2), ("rank", 4)]
    assert import_responses(store, rows, mode="ranking")["new_comparisons"] == 0
    many = [{"prompt": "Nine?", "response": f"answer {i}", "model": f"m{i}"} for i in range(9)]
    assert import_responses(store, read_responses(write_jsonl(tmp_path / "9.jsonl", many)), mode="ranking")[
        "too_many"] == 1  # fmt: skip


def test_the_command_prints_a_summary_and_loads_no_heavy_library(tmp_path, capsys):
    db, path = str(tmp_path / "l.db"), str(write_jsonl(tmp_path / "r.jsonl", ROWS))
    assert main(["label", "import", "--db", db, "--file", path, "--overlap", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("7 rows, 3 prompts: 7 new responses, 6 new comparisons; 1 prompt skipped (responses "
                          "from one model only)")  # fmt: skip
    assert main(["label", "import", "--db", db, "--file", path]) == 0
    assert "0 new responses, 0 new comparisons" in capsys.readouterr().out
    assert heavy_modules_after(f"assert cli.main(['label', 'import', '--db', {db!r}, '--file', {path!r}]) == 0") == []


def test_a_nul_character_or_an_overlong_model_name_is_refused_with_its_line(tmp_path):
    """PostgreSQL cannot store a NUL in text, nor a model name over its column's 1024 characters: the file is
    refused before the database is touched, on either backend, naming the line."""
    import pytest

    from rlhf.errors import DataError

    for bad, problem in (({"response": "A\x00."}, "holds a NUL character"),
                         ({"prompt": [{"role": "user", "content": "Q\x00?"}]}, "holds a NUL character"),
                         ({"model": "m" * 1025}, "'model' is longer than 1024 characters")):
        rows = [ROWS[0], {**ROWS[1], **bad}]
        path = write_jsonl(tmp_path / "r.jsonl", rows)
        with pytest.raises(DataError, match=f"r.jsonl:2.*{problem}"):
            read_responses(str(path))


def test_a_nul_in_a_gold_file_is_refused_and_one_a_model_wrote_is_dropped(db_url, tmp_path):
    import pytest

    from feedback_ui.candidates import add_candidates, read_gold
    from rlhf.errors import DataError

    gold = write_jsonl(tmp_path / "gold.jsonl", [{"prompt": "Q?", "chosen": "Yes\x00.", "rejected": "No."}])
    with pytest.raises(DataError, match="gold.jsonl:1 holds a NUL character"):
        read_gold(str(gold))
    store = init_db(db_url)
    assert add_candidates(store, "Q?", ["A\x00nswer.", "Other."], policy="m") == (2, 1)
    with store.read() as s:
        assert sorted(s.scalars(sa.select(Response.text))) == ["Answer.", "Other."]
    store.close()
