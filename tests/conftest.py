import pytest

from rlhf.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama causal LM + local tokenizer saved with save_pretrained."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep caches and TensorBoard logs of every test inside its tmp folder."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "rlhf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
