"""Loading datasets and putting them into the shapes stages train on.

``dataset_name`` may be a ``.jsonl/.json/.parquet/.csv`` file, a folder written
by ``Dataset.save_to_disk``, ``sample:NAME`` for the data shipped with the
package (``sample:sft``, ``sample:prompts``, ``sample:prompts_test``), or a hub id.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.errors import DataError

ASSETS = Path(__file__).parent / "assets"
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def sample_path(name: str) -> Path:
    """Path of a dataset shipped with the package (``sample:NAME``)."""
    path = ASSETS / f"{name}.jsonl"
    if not path.is_file():
        known = ", ".join(sorted(f"sample:{p.stem}" for p in ASSETS.glob("*.jsonl")))
        raise DataError(f"unknown sample dataset 'sample:{name}' (known: {known})")
    return path


def resolve_dataset_path(dataset_name: str) -> str:
    if dataset_name.startswith("sample:"):
        return str(sample_path(dataset_name.split(":", 1)[1]))
    return dataset_name


@contextmanager
def quiet_datasets():
    """No progress bars and no logged errors from ``datasets`` (its failures become one DataError)."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()


def _load(datasets, dataset_name: str, name: str, path: Path, split: str):
    if path.is_dir():
        if not any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DataError(f"folder {path} is not a dataset saved with save_to_disk")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"dataset {path} has no split '{split}' (has: {', '.join(ds)})")
            ds = ds[split]
        return ds
    if path.suffix.lower() in _BUILDERS:
        if path.stat().st_size == 0:
            raise DataError(f"dataset {dataset_name} is empty")
        return datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    if path.exists():
        raise DataError(f"unsupported dataset file type '{path.suffix}' ({path}); use .jsonl, .json, .parquet or .csv")
    return datasets.load_dataset(name, split=split)


def check_dataset_source(dataset_name: str) -> None:
    """What :func:`load_table` checks before reading: a known ``sample:`` name, an existing local file or folder
    for a path (a file name with a data suffix, or a name that can only be a path); any other name is left to
    the hub. A DataError names the problem."""
    if not dataset_name:
        raise DataError("no dataset given (set dataset_name)")
    name = resolve_dataset_path(dataset_name)
    path = Path(name).expanduser()
    if path.exists():
        return
    if path.suffix.lower() in _BUILDERS:
        raise DataError(f"dataset file not found: {path}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"dataset not found: {name}")


def load_table(dataset_name: str, split: str = "train"):
    """Load ``dataset_name`` as a ``datasets.Dataset``; errors name the file and the problem."""
    import datasets

    check_dataset_source(dataset_name)
    name = resolve_dataset_path(dataset_name)
    path = Path(name).expanduser()
    try:
        with quiet_datasets():
            ds = _load(datasets, dataset_name, name, path, split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable input
        raise DataError(unreadable_reason(dataset_name, path, exc)) from None
    if len(ds) == 0:
        raise DataError(f"dataset {dataset_name} is empty")
    if len(ds.column_names) == 1 and path.suffix.lower() == ".csv":
        (only,) = ds.column_names
        for sep in (";", "\t", "|"):
            if sep in only:
                raise DataError(f"dataset {dataset_name}: .csv files must be comma-separated; its one column "
                                f"{only!r} looks {sep!r}-separated")  # fmt: skip
    return ds


def unreadable_reason(dataset_name: str, path: Path, exc: Exception) -> str:
    """One line on why ``datasets`` could not read ``path``: the first bad JSONL line when there is one."""
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return f"dataset {dataset_name} is not UTF-8 text"
        if not text.strip():
            return f"dataset {dataset_name} is empty"
        if path.suffix.lower() == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"dataset {dataset_name} line {n} is not valid JSON ({err.msg})"
                if not isinstance(row, dict):
                    return f"dataset {dataset_name} line {n} must be a JSON object, got {type(row).__name__}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot read dataset {dataset_name}: {first}"


def require_columns(ds, options: list[tuple[str, ...]], dataset_name: str) -> tuple[str, ...]:
    """Return the first column set in ``options`` that ``ds`` has; else a DataError naming them."""
    for columns in options:
        if all(c in ds.column_names for c in columns):
            return columns
    wanted = " or ".join("/".join(cols) for cols in options)
    raise DataError(f"dataset {dataset_name} needs columns {wanted}; it has: {', '.join(ds.column_names)}")


def fingerprint(dataset_name: str) -> str:
    """Short content hash of a local dataset file/folder (or of the name for a hub id)."""
    path = Path(resolve_dataset_path(dataset_name))
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        digest.update(dataset_name.encode())
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


# chat formatting


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an empty list" if not value else "a list that is not {role, content} messages with string values"
    return f"{type(value).__name__} {value!r}"[:80]


def to_messages(prompt: Any, role: str = "user") -> list[dict]:
    """A prompt given as a string or a list of ``{role, content}`` (strings) -> a message list."""
    if isinstance(prompt, str):
        return [{"role": role, "content": prompt}]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)
    ):  # fmt: skip
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"a prompt must be a string or a list of {{role, content}} messages, got {_describe(prompt)}")


def column_messages(example: dict, column: str, role: str = "user") -> list[dict]:
    """``example[column]`` as a message list; a DataError names the column."""
    try:
        return to_messages(example.get(column), role)
    except DataError:
        raise DataError(
            f"column '{column}' must be a string or a list of {{role, content}} messages, "
            f"got {_describe(example.get(column))}"
        ) from None


def prompt_text(prompt: Any) -> str:
    """A readable one-string form of a prompt (the last user turn for message lists)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in to_messages(prompt) if m["role"] == "user"]
    return users[-1] if users else to_messages(prompt)[-1]["content"]


def sft_record(example: dict) -> dict:
    """One SFT example (``messages`` or ``prompt``/``completion``) -> conversational prompt/completion.

    The completion is the final assistant turn, so the loss covers only it.
    """
    if "messages" in example and (example["messages"] is not None or "prompt" not in example):
        messages = column_messages(example, "messages")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError("each 'messages' list must end with an assistant turn after at least one other turn")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    prompt = column_messages(example, "prompt")
    return {"prompt": prompt, "completion": column_messages(example, "completion", "assistant")}


def load_sft_dataset(dataset_name: str):
    """SFT data as conversational ``prompt``/``completion`` columns."""
    ds = load_table(dataset_name)
    require_columns(ds, [("messages",), ("prompt", "completion")], dataset_name)
    def record(example: dict, index: int) -> dict:
        try:
            return sft_record(example)
        except DataError as exc:
            raise DataError(f"dataset {dataset_name} row {index}: {exc}") from None

    with quiet_datasets():
        return ds.map(record, with_indices=True, remove_columns=ds.column_names)


def load_prompts(dataset_name: str, max_prompts: int | None = None) -> list[list[dict]]:
    """Prompts (``prompt`` column: strings or message lists) as message lists."""
    ds = load_table(dataset_name)
    require_columns(ds, [("prompt",)], dataset_name)
    rows = ds["prompt"] if max_prompts is None else ds.select(range(min(max_prompts, len(ds))))["prompt"]
    out = []
    for index, prompt in enumerate(rows):
        try:
            out.append(column_messages({"prompt": prompt}, "prompt"))
        except DataError as exc:
            raise DataError(f"dataset {dataset_name} row {index}: {exc}") from None
    return out


def split_train_eval(ds, eval_fraction: float, seed: int, eval_dataset=None):
    """(train, eval) from a second dataset if given, else a seeded random fraction (eval may be None)."""
    if eval_dataset is not None:
        return ds, eval_dataset
    if eval_fraction <= 0:
        return ds, None
    n_eval = max(1, round(len(ds) * eval_fraction))
    if n_eval >= len(ds):
        raise DataError(f"eval_fraction {eval_fraction} leaves no training examples out of {len(ds)}")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
