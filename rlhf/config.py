"""Stage configs: YAML file + ``--key value`` overrides -> a validated dataclass.

Every stage describes its options as a dataclass whose fields carry a default
and ``metadata={"help": ...}``. :func:`parse_config` reads ``--config FILE``
(optional), applies command-line overrides on top, converts values to the
field types and runs the dataclass' ``__post_init__`` validation. Any problem
raises :class:`~rlhf.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from rlhf.errors import ConfigError

# helper functions


def field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    if typing.get_origin(inner) is Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is list:
        (item_tp,) = typing.get_args(inner) or (str,)
        name = "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item_tp, "values")
    elif inner is dict or typing.get_origin(inner) is dict:
        name = "a mapping of key: value"
    else:
        name = {int: "an integer", float: "a finite number", bool: "true/false", str: "a string"}.get(inner, str(inner))
    return name + (" or null" if optional else "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type ``tp``."""
    inner, optional = _strip_optional(tp)
    from_cli = isinstance(value, str)
    if value is None or (optional and from_cli and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got null")
    bad = ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        for choice in choices:
            if value == choice or (from_cli and str(choice) == value):
                return choice
        raise bad
    if origin is list:
        (item_tp,) = typing.get_args(inner) or (str,)
        if from_cli:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        items = []
        for item in value:
            try:
                items.append(coerce(key, item, item_tp))
            except ConfigError:
                raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got item {item!r}") from None
        return items
    if inner is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and value.lower() in ("false", "0", "no", "off"):
            return False
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli:
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(number):  # no key means nan or inf; nan fails or passes range checks by accident
            raise bad
        return number
    if inner is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    if inner is dict or typing.get_origin(inner) is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def config_fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            f.type = hints[f.name]
            out[f.name] = f
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing or malformed file is a ConfigError."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}") from None
    if data is None:  # an empty file (or only comments): no keys
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of key: value")
    return data


def build_config(cls, values: dict):
    """Instantiate ``cls`` from a dict, rejecting unknown keys and converting types."""
    fields = config_fields(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}' for {cls.__name__}")
    kwargs = {k: coerce(k, v, fields[k].type) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def config_to_dict(cfg) -> dict:
    return {k: getattr(cfg, k) for k in config_fields(type(cfg))}


def save_config(cfg, path: str | os.PathLike) -> None:
    """``cfg`` as YAML; a path key (:func:`is_path_key`) that names an existing file or folder by a relative path is
    written absolute, so that the record (and ``--config`` on it, or an export's ``--from sft``) works from any
    directory."""
    import yaml

    values = {key: str(Path(value).resolve()) if is_path_key(key) and _relative_existing_path(value) else value
              for key, value in config_to_dict(cfg).items()}  # fmt: skip
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


PATH_KEYS = {"model_name_or_path", "reward_model", "policy_init", "gold", "adapter", "policy", "baseline",
             "resume_from_checkpoint", "ppo_logs", "db", "out"}


def is_path_key(key: str) -> bool:
    """Whether a config key holds a file or folder (not a choice such as ``kl_in: reward``)."""
    return key in PATH_KEYS or key.endswith(("_adapter", "_dir", "dataset_name", "_file"))


def _relative_existing_path(value) -> bool:
    return isinstance(value, str) and bool(value) and not os.path.isabs(value) and ":" not in value \
        and Path(value).exists()


# command line


_NEGATIVE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_values(args: list[str]) -> list[str]:
    """``--key -1e-4`` -> ``--key=-1e-4``: argparse takes only plain negative numbers like ``-1`` as values."""
    out: list[str] = []
    for arg in args:
        if out and _NEGATIVE.match(arg) and out[-1].startswith("--") and "=" not in out[-1] and out[-1] != "--":
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit status 2."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(_join_negative_values(args), namespace)

    def error(self, message: str):  # noqa: D401 - argparse API
        raise ConfigError(message.replace("unrecognized arguments", "unknown config key(s)"))


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--config`` and one ``--key`` option per dataclass field (defaults shown in help)."""
    parser.add_argument("--config", default=None, help="YAML file with defaults for any option below")
    for name, f in config_fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp, _ = _strip_optional(f.type)
        choices = list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" (choices: {', '.join(map(str, choices))})"
        parser.add_argument(
            f"--{name}",
            default=argparse.SUPPRESS,
            metavar=name.upper() if tp is not bool else "BOOL",
            nargs="?" if tp is bool else None,
            const="true" if tp is bool else None,
            help=f"{help_text} [default: {default}]".replace("%", "%%"),  # argparse formats help with %
        )


def config_from_namespace(cls, ns: argparse.Namespace, skip: tuple[str, ...] = ()):
    """Merge ``--config`` YAML (if any) with explicit command-line options into ``cls``."""
    values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    fields = config_fields(cls)
    for key, value in vars(ns).items():
        if key in fields and key not in skip:
            values[key] = value
    return build_config(cls, values)


def make_parser(prog: str, cls, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.HelpFormatter)
    add_config_arguments(parser, cls)
    return parser


def parse_config(cls, argv: list[str], prog: str = "rlhf"):
    """Parse ``argv`` (``--config FILE`` and ``--key value`` pairs) into a validated ``cls``."""
    ns = make_parser(prog, cls).parse_args(argv)
    return config_from_namespace(cls, ns)


# shared validation


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_lora_keys(cfg) -> None:
    """The LoRA keys every training stage shares (``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules``) are in range."""
    require(cfg.lora_r >= 1, "config key 'lora_r' must be >= 1")
    require(cfg.lora_alpha >= 1, "config key 'lora_alpha' must be >= 1")
    require(0 <= cfg.lora_dropout < 1, "config key 'lora_dropout' must be in [0, 1)")
    require(bool(cfg.lora_target_modules), "config key 'lora_target_modules' must not be empty")


@dataclasses.dataclass
class TrainingConfig:
    """Keys every training stage shares (names follow ``transformers.TrainingArguments``)."""

    model_name_or_path: str = field(
        "smollm2-135m-instruct", "base model: HF folder, hub id, or the embedded alias smollm2-135m-instruct"
    )
    dataset_name: str = field("", "training data: .jsonl/.json/.parquet/.csv file, save_to_disk folder, sample:NAME, or hub id")
    output_dir: str = field("outputs/run", "folder the stage writes (created; replaced only when complete)")
    seed: int = field(42, "random seed")
    num_train_epochs: float = field(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = field(-1, "optimizer steps; -1 means use num_train_epochs")
    max_train_seconds: Optional[float] = field(
        None, "stop training after the step at which this many seconds have passed on train_clock (the "
        "learning-rate schedule still spans max_steps); null = no time limit"
    )
    train_clock: Literal["wall", "cpu"] = field(
        "wall", "clock of max_train_seconds: wall = elapsed time, cpu = CPU seconds this process used (all "
        "threads; steadier than wall time on a shared machine)"
    )
    learning_rate: float = field(2e-4, "peak learning rate")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        "cosine", "learning-rate schedule"
    )
    warmup_steps: int = field(0, "linear warm-up steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    per_device_train_batch_size: int = field(8, "training batch size per device")
    per_device_eval_batch_size: int = field(8, "evaluation batch size per device")
    gradient_accumulation_steps: int = field(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = field(1.0, "gradient clipping norm")
    logging_steps: int = field(5, "log every N optimizer steps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", "numeric precision; auto = bf16 on a GPU that supports it, else fp32"
    )
    gradient_checkpointing: bool = field(False, "trade compute for memory")
    report_to: Literal["none", "tensorboard"] = field("tensorboard", "where training logs go besides metrics.json")

    def __post_init__(self):
        require(bool(self.model_name_or_path), "config key 'model_name_or_path' must not be empty")
        require(bool(self.output_dir), "config key 'output_dir' must not be empty")
        require(self.learning_rate > 0, "config key 'learning_rate' must be > 0")
        require(self.per_device_train_batch_size >= 1, "config key 'per_device_train_batch_size' must be >= 1")
        require(self.per_device_eval_batch_size >= 1, "config key 'per_device_eval_batch_size' must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "config key 'gradient_accumulation_steps' must be >= 1")
        require(self.max_steps == -1 or self.max_steps >= 1, "config key 'max_steps' must be -1 or >= 1")
        require(self.max_train_seconds is None or self.max_train_seconds > 0,
                "config key 'max_train_seconds' must be > 0 (or null)")
        require(self.num_train_epochs > 0, "config key 'num_train_epochs' must be > 0")
        require(self.logging_steps >= 1, "config key 'logging_steps' must be >= 1")
        require(self.warmup_steps >= 0, "config key 'warmup_steps' must be >= 0")
        require(self.weight_decay >= 0, "config key 'weight_decay' must be >= 0")
        require(self.max_grad_norm > 0, "config key 'max_grad_norm' must be > 0")


__all__ = [
    "Literal",
    "Optional",
    "TrainingConfig",
    "add_config_arguments",
    "build_config",
    "config_from_namespace",
    "config_to_dict",
    "field",
    "load_yaml",
    "make_parser",
    "parse_config",
    "require",
    "save_config",
]
