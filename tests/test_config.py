import dataclasses

import pytest

from rlhf.config import Literal, Optional, TrainingConfig, build_config, field, load_yaml, parse_config, require, save_config
from rlhf.errors import ConfigError


@dataclasses.dataclass
class ToyConfig(TrainingConfig):
    method: Literal["a", "b"] = field("a", "which method")
    rank: int = field(8, "rank")
    dropout: float = field(0.1, "dropout")
    flag: bool = field(False, "a switch")
    targets: list[str] = field(["all"], "names")
    extra: Optional[str] = field(None, "optional")

    def __post_init__(self):
        super().__post_init__()
        require(self.rank >= 1, "config key 'rank' must be >= 1")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "rank: 4\nmethod: b\ntargets: [q, v]\nlearning_rate: 1.0e-3\n")
    cfg = parse_config(ToyConfig, ["--config", path, "--rank", "16", "--flag", "--extra", "x"])
    assert cfg.rank == 16  # CLI wins over YAML
    assert cfg.method == "b" and cfg.targets == ["q", "v"] and cfg.learning_rate == 1e-3
    assert cfg.flag is True and cfg.extra == "x"
    assert cfg.dropout == 0.1  # default kept


def test_cli_types_are_converted():
    cfg = parse_config(ToyConfig, ["--dropout", "0.5", "--flag", "false", "--targets", "a,b", "--extra", "none"])
    assert cfg.dropout == 0.5 and cfg.flag is False and cfg.targets == ["a", "b"] and cfg.extra is None


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("bogus: 1\n", "bogus"),
        ("rank: many\n", "rank"),
        ("rank: 1.5\n", "rank"),
        ("method: c\n", "method"),
        ("flag: maybe\n", "flag"),
        ("rank: 0\n", "rank"),
        ("learning_rate: -1\n", "learning_rate"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, yaml_text, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(ToyConfig, ["--config", write(tmp_path, yaml_text)])


def test_unknown_cli_key_rejected():
    with pytest.raises(ConfigError, match="--nope"):
        parse_config(ToyConfig, ["--nope", "1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(write(tmp_path, "- 1\n- 2\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(ToyConfig, {"rank": 3, "targets": ["x"], "method": "b"})
    save_config(cfg, tmp_path / "run_config.yaml")
    again = parse_config(ToyConfig, ["--config", str(tmp_path / "run_config.yaml")])
    assert again == cfg


def test_a_relative_path_is_saved_absolute_and_other_values_as_they_are(tmp_path, monkeypatch):
    import yaml

    from rlhf.ppo.config import PPOStageConfig

    monkeypatch.chdir(tmp_path)
    for folder in ("outputs/sft", "reward"):  # "reward": also the name of a choice of kl_in
        (tmp_path / folder).mkdir(parents=True)
    cfg = PPOStageConfig(sft_adapter="outputs/sft", kl_in="reward", dataset_name="sample:prompts")
    save_config(cfg, tmp_path / "run_config.yaml")
    saved = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    assert saved["sft_adapter"] == str(tmp_path / "outputs" / "sft")  # found again from any directory
    assert saved["kl_in"] == "reward" and saved["dataset_name"] == "sample:prompts"  # not paths: as given
    save_config(PPOStageConfig(sft_adapter="not/there"), tmp_path / "run_config.yaml")
    assert yaml.safe_load((tmp_path / "run_config.yaml").read_text())["sft_adapter"] == "not/there"
