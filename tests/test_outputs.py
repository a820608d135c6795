"""Output folders that replace an earlier run's only when complete, and never a file of the user's."""

import pytest

from rlhf.errors import UserError
from rlhf.outputs import staged_output


def test_a_finished_run_replaces_the_previous_one_and_leaves_the_folders_beside_it(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run_config.yaml").write_text("seed: 1\n")  # an earlier run's output
    (out / "old_weights.bin").write_text("old")
    backup = tmp_path / "o.old"  # the user's own folder, named like a backup
    backup.mkdir()
    (backup / "keep.txt").write_text("mine")
    with staged_output(out) as work:
        assert work != out and not (out / "new.bin").exists()
        (work / "run_config.yaml").write_text("seed: 2\n")
        (work / "new.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.bin", "run_config.yaml"]  # no staging mark left
    assert (backup / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "o.old"]  # nothing else left beside it


def test_a_failed_run_leaves_the_previous_output_as_it_was(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run_config.yaml").write_text("seed: 1\n")
    with pytest.raises(RuntimeError):
        with staged_output(out) as work:
            (work / "half.bin").write_text("half")
            raise RuntimeError("training failed")
    assert [p.name for p in out.iterdir()] == ["run_config.yaml"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_a_staging_folder_an_interrupted_run_left_is_reused(tmp_path):
    out = tmp_path / "o"
    (tmp_path / "o.incomplete").mkdir()  # as a killed process leaves it: made by a run, marked as such
    (tmp_path / "o.incomplete" / ".rlhf-staging").touch()
    with staged_output(out) as work:
        (work / "run_config.yaml").write_text("seed: 1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.parametrize("user_files, expected", [
    ({"o/thesis.txt": "my thesis"}, "holds files no rlhf stage wrote (thesis.txt)"),
    ({"o.incomplete/keep.txt": "mine"}, "was not left by one"),
])  # fmt: skip
def test_a_folder_of_the_users_files_is_refused_before_anything_is_written(tmp_path, user_files, expected):
    for name, text in user_files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError) as info:
        with staged_output(tmp_path / "o"):
            pytest.fail("the body must not run")
    assert expected in str(info.value)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_outputs_get_the_mode_of_a_plain_file_under_the_umask(tmp_path):
    """safetensors and temporary files are created owner-only; published outputs are not."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from rlhf.outputs import write_json, write_jsonl

    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "o") as work:
            save_file({"w": torch.zeros(2)}, str(work / "adapter_model.safetensors"))
            (work / "run_config.yaml").write_text("seed: 1\n")
        write_json(tmp_path / "metrics.json", {"a": 1})
        write_jsonl(tmp_path / "prefs.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    for path in (tmp_path / "o" / "adapter_model.safetensors", tmp_path / "metrics.json", tmp_path / "prefs.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
