"""Preference layouts -> :class:`PreferencePair`: the implementation lives in :mod:`rlhf.pairs`.

Kept as an import path for the reward package; ``rlhf dpo`` reads the same files through ``rlhf.pairs``.
"""

from rlhf.pairs import (  # noqa: F401
    ASSISTANT_MARK,
    LAYOUT_COLUMNS,
    Layout,
    PreferencePair,
    detect_layout,
    load_pairs,
    normalize_row,
    normalize_rows,
    parse_dialogue,
    split_by_prompt,
    split_dialogues,
)
