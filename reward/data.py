"""Preference files -> :class:`~rlhf.pairs.PreferencePair` lists -> tokenised training tables."""

from __future__ import annotations

from reward.modeling import encode_for_reward
from rlhf.pairs import PreferencePair


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> dict[str, list]:
    """Columns ``chosen_ids``, ``rejected_ids``, ``chosen_len``, ``rejected_len`` (response tokens)."""
    prompts = [p.prompt_messages for p in pairs]
    chosen, chosen_len = encode_for_reward(tokenizer, prompts, [p.chosen for p in pairs], max_length)
    rejected, rejected_len = encode_for_reward(tokenizer, prompts, [p.rejected for p in pairs], max_length)
    return {"chosen_ids": chosen, "rejected_ids": rejected, "chosen_len": chosen_len, "rejected_len": rejected_len}


def pairs_to_dataset(
    tokenizer, pairs: list[PreferencePair], max_length: int, with_margin: bool, with_lengths: bool = False
):
    """A ``datasets.Dataset`` tokenised for TRL's RewardTrainer: ``chosen_ids``, ``rejected_ids``[, ``margin``]
    [, ``chosen_len``, ``rejected_len`` (response tokens)]."""
    import datasets

    enc = encode_pairs(tokenizer, pairs, max_length)
    columns = {"chosen_ids": enc["chosen_ids"], "rejected_ids": enc["rejected_ids"]}
    if with_margin:
        columns["margin"] = [float(p.margin or 0.0) for p in pairs]
    if with_lengths:
        columns["chosen_len"], columns["rejected_len"] = enc["chosen_len"], enc["rejected_len"]
    return datasets.Dataset.from_dict(columns)
