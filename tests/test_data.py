import json

import pytest

from rlhf.data import load_prompts, load_sft_dataset, load_table, sample_path, split_train_eval, to_messages
from rlhf.errors import DataError
from rlhf.testing import write_jsonl

ROWS = [{"prompt": "Hi?", "completion": "Hello."}, {"prompt": "Bye?", "completion": "Goodbye."}]


def test_file_formats_and_disk_folder_load_the_same(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "disk"))
    for name in ["d.jsonl", "d.json", "d.parquet", "d.csv", "disk"]:
        assert load_table(str(tmp_path / name)).to_list() == ROWS, name


def test_sample_datasets_ship_with_the_package():
    sft = load_table("sample:sft")
    prompts = load_table("sample:prompts")
    test = load_table("sample:prompts_test")
    assert len(sft) >= 150 and len(prompts) >= 150 and len(test) >= 40
    assert not set(prompts["prompt"]) & set(test["prompt"])
    assert sample_path("sft").is_file()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("", "empty"),
        ("{not json\n", "line 1 is not valid JSON"),
        ('{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
        ("\n  \n", "empty"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_table(str(path))


def test_unknown_sample_and_extension(tmp_path):
    with pytest.raises(DataError, match="sample:sft"):
        load_table("sample:nope")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported"):
        load_table(str(tmp_path / "x.txt"))


def test_missing_column_is_named(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "a"}])
    with pytest.raises(DataError, match="prompt"):
        load_prompts(str(path))
    with pytest.raises(DataError, match="messages or prompt/completion"):
        load_sft_dataset(str(path))


def test_sft_formats_become_prompt_completion(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    row = load_sft_dataset(str(path))[0]
    assert row["prompt"] == msgs[:2] and row["completion"] == msgs[2:]
    row = load_sft_dataset(str(write_jsonl(tmp_path / "p.jsonl", ROWS[:1])))[0]
    assert row == {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello."}]}
    bad = write_jsonl(tmp_path / "b.jsonl", [{"messages": msgs[:2]}])
    with pytest.raises(DataError, match="assistant"):
        load_sft_dataset(str(bad))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "Hi?", "completion": None}], "row 0: column 'completion' .* got null"),
        ([{"prompt": "Hi?", "completion": "a"}, {"prompt": 7, "completion": "b"}], "row 1: column 'prompt' .* got int 7"),
        ([{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant"}]}], "row 0: column 'messages'"),
        ([{"messages": []}], "column 'messages' .* got an empty list"),
    ],
)
def test_sft_rows_with_missing_or_mistyped_values_name_row_and_column(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_sft_dataset(str(write_jsonl(tmp_path / "x.jsonl", rows)))


def test_null_prompt_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": None}])
    with pytest.raises(DataError, match="row 1: column 'prompt' .* got null"):
        load_prompts(str(path))


def test_semicolon_csv_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt;completion\nHi?;Hello.\n")
    with pytest.raises(DataError, match="comma-separated"):
        load_sft_dataset(str(path))


def test_split_and_messages():
    import datasets

    ds = datasets.Dataset.from_list([{"x": i} for i in range(10)])
    train, ev = split_train_eval(ds, 0.2, seed=0)
    assert len(train) == 8 and len(ev) == 2 and not set(train["x"]) & set(ev["x"])
    assert split_train_eval(ds, 0.0, seed=0)[1] is None
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(DataError):
        to_messages(3)
