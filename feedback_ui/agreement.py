"""Inter-annotator agreement on nominal labels (pure functions, no database).

A *unit* is one item (comparison) and the labels the labelers gave it; units
with fewer than two labels carry no agreement information and are ignored.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Hashable, Optional, Sequence


def percent_agreement(units: Sequence[Sequence[Hashable]]) -> Optional[float]:
    """Share of agreeing label pairs: sum_u #{i<j: l_ui = l_uj} / sum_u C(m_u, 2); None without pairs."""
    agree = pairs = 0
    for labels in units:
        for x, y in combinations(labels, 2):
            pairs += 1
            agree += x == y
    return agree / pairs if pairs else None


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> Optional[float]:
    """Cohen's kappa of two labelers on the same items (position i = item i).

    kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement
    (1/N) sum_i [a_i = b_i] and p_e = sum_c p_a(c) p_b(c) the agreement expected
    from each labeler's marginal label frequencies. None when N = 0 or
    p_e = 1 (both labelers always give the same single label: undefined).
    """
    if len(labels_a) != len(labels_b):
        raise ValueError("both labelers need a label for every item")
    n = len(labels_a)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(labels_a, labels_b)) / n
    freq_a, freq_b = Counter(labels_a), Counter(labels_b)
    p_e = sum(freq_a[c] * freq_b[c] for c in freq_a) / (n * n)
    if p_e == 1:
        return None
    return (p_o - p_e) / (1 - p_e)


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable]]) -> Optional[float]:
    """Krippendorff's alpha for nominal data, any number of labelers, missing labels allowed.

    Coincidence matrix over pairable units (m_u >= 2 labels):
        o_ck = sum_u (number of ordered pairs (c, k) of labels in u, i != j) / (m_u - 1)
        n_c = sum_k o_ck,  n = sum_c n_c
    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k.
    None when there are no pairable units or only one label value occurs (D_e = 0).
    """
    o: Counter = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for i in range(m):
            for j in range(m):
                if i != j:
                    o[(labels[i], labels[j])] += 1.0 / (m - 1)
    n_c: Counter = Counter()
    for (c, _k), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    disagree_obs = sum(v for (c, k), v in o.items() if c != k)
    disagree_exp = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if n == 0 or disagree_exp == 0:
        return None
    return 1.0 - (n - 1) * disagree_obs / disagree_exp
