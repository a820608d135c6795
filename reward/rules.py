"""A transparent labelling rule: concise, complete answers of about ``TARGET_WORDS`` words.

Used by the reward benchmark, the PPO benchmark and the demo's simulated labelers, so that an
RM can be checked against a known preference and PPO against a known goal::

    closeness(w)  = max(0, 1 - |w - TARGET_WORDS| / TARGET_WORDS)      # 1 at the target, 0 at 0 or 2x target words
    full_stop     = 1 if the response (right-stripped) ends with "." else 0
    rule_score    = 0.5 * closeness(w) + 0.5 * full_stop                  # in [0, 1]; an empty response scores 0

``w`` is the number of whitespace-separated words. The small embedded model often rambles
until it is cut off at ``max_new_tokens`` (no full stop, 40+ words), so the rule separates its
own samples well, and a policy can raise it by answering briefly and finishing the sentence.
The prompt is not used (kept in the signature so rules that look at it fit the same slot).
"""

from __future__ import annotations

from typing import Any, Literal

TARGET_WORDS = 20
MIN_GAP = 0.3  # rule_prefers' default: pairs closer than this are ties


def word_count(text: str) -> int:
    return len(text.split())


def ends_with_full_stop(response: str) -> bool:
    """The rule's second half: the right-stripped response ends with "."."""
    return response.rstrip().endswith(".")


def rule_score(prompt: Any, response: str, target_words: int = TARGET_WORDS) -> float:
    """``0.5 * closeness(words) + 0.5 * ends_with_full_stop``, in [0, 1] (see module docstring)."""
    words = word_count(response)
    if words == 0:
        return 0.0
    closeness = max(0.0, 1.0 - abs(words - target_words) / target_words)
    full_stop = 1.0 if ends_with_full_stop(response) else 0.0
    return 0.5 * closeness + 0.5 * full_stop


def rule_prefers(
    prompt: Any, a: str, b: str, min_gap: float = MIN_GAP, target_words: int = TARGET_WORDS
) -> Literal["a", "b"] | None:
    """``"a"`` or ``"b"``, whichever has the higher :func:`rule_score`; None if they differ by < ``min_gap``."""
    diff = rule_score(prompt, a, target_words) - rule_score(prompt, b, target_words)
    if abs(diff) < min_gap or diff == 0:
        return None
    return "a" if diff > 0 else "b"
