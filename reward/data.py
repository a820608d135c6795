"""Preference files -> :class:`~reward.pairs_format.PreferencePair` lists -> tokenised training tables."""

from __future__ import annotations

from reward.modeling import encode_for_reward
from reward.pairs_format import LAYOUT_COLUMNS, PreferencePair, detect_layout, normalize_rows
from rlhf.data import load_table

_USED = ("prompt", "chosen", "rejected", "margin")


def load_pairs(dataset_name: str) -> list[PreferencePair]:
    """Every pair of a preference dataset in any supported layout (DataError naming missing/bad columns)."""
    ds = load_table(dataset_name)
    layout = detect_layout(ds.column_names, ds[0])
    keep = [c for c in ds.column_names if c in _USED and (c in LAYOUT_COLUMNS[layout] or c == "margin")]
    rows = ds.select_columns(keep).to_list()
    return normalize_rows(rows, ds.column_names, source=f"dataset {dataset_name}")


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> dict[str, list]:
    """Columns ``chosen_ids``, ``rejected_ids``, ``chosen_len``, ``rejected_len`` (response tokens)."""
    prompts = [p.prompt_messages for p in pairs]
    chosen, chosen_len = encode_for_reward(tokenizer, prompts, [p.chosen for p in pairs], max_length)
    rejected, rejected_len = encode_for_reward(tokenizer, prompts, [p.rejected for p in pairs], max_length)
    return {"chosen_ids": chosen, "rejected_ids": rejected, "chosen_len": chosen_len, "rejected_len": rejected_len}


def pairs_to_dataset(tokenizer, pairs: list[PreferencePair], max_length: int, with_margin: bool):
    """A ``datasets.Dataset`` tokenised for TRL's RewardTrainer: ``chosen_ids``, ``rejected_ids``[, ``margin``]."""
    import datasets

    enc = encode_pairs(tokenizer, pairs, max_length)
    columns = {"chosen_ids": enc["chosen_ids"], "rejected_ids": enc["rejected_ids"]}
    if with_margin:
        columns["margin"] = [float(p.margin or 0.0) for p in pairs]
    return datasets.Dataset.from_dict(columns)
