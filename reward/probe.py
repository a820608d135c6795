"""A linear probe as the reward head's starting point (``head_init: probe``).

Before any LoRA step, the trunk is frozen as built: each distinct training response is pooled once
(:func:`reward.pooling.pooled_hidden`, the config's ``pooling``), and the head ``w`` is fitted to the
pairs by L2-regularised Bradley–Terry (logistic regression on feature differences)::

    z      = x / std                               # std per feature, over the training responses
    loss   = mean_pairs softplus(-(z_chosen - z_rejected) . v) + l2 * |v|^2
    w      = v / std                               # the head reads x itself (no mean: it cancels in every pair)

``l2`` is chosen by k-fold cross-validation over whole prompts (the pairs of one prompt stay in one
fold), from a fixed grid. Where the features come in two nested sets (``pooling: last_mean_embeddings[_max]``:
the block's state, then the input embeddings' features beside it), :func:`probe_feature_set` fits both and keeps
the wider one only if it earns its place by cross-validation; :func:`choose_pooling` does the same between
poolings (``pooling: auto``). Fine-tuning then starts from a head that already ranks the pairs, instead of a
random one whose early gradients reshape the trunk to fit it (linear probing then
fine-tuning, Kumar et al. 2022). Pure functions on tensors; the wiring is :func:`reward.member.probe_head`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def fit_bradley_terry(diffs: torch.Tensor, l2: float, max_iter: int = 100) -> torch.Tensor:
    """``argmin_v mean softplus(-diffs @ v) + l2 * |v|^2`` for ``diffs`` (P, D) -> ``v`` (D,), float64.

    Strictly convex for ``l2 > 0``; solved with L-BFGS from ``v = 0``.
    """
    if l2 <= 0:
        raise ValueError("l2 must be > 0")
    x = diffs.detach().to(torch.float64)
    v = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.softplus(-(x @ v)).mean() + l2 * (v * v).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return v.detach()


def folds_by_group(groups: list, k: int) -> list[int]:
    """Fold index per row: the distinct groups in order of first appearance, dealt round-robin into ``k`` folds."""
    order: dict = {}
    for g in groups:
        order.setdefault(g, len(order) % k)
    return [order[g] for g in groups]


def cv_accuracy(diffs: torch.Tensor, folds: list[int], l2: float) -> float:
    """Share of pairs ranked right (``diffs @ v > 0``) by a probe fitted without their fold."""
    fold_ids = torch.tensor(folds)
    right = 0
    for f in sorted(set(folds)):
        held = fold_ids == f
        if held.all():
            continue
        v = fit_bradley_terry(diffs[~held], l2)
        right += int((diffs[held].to(torch.float64) @ v > 0).sum())
    return right / len(folds)


def choose_l2(diffs: torch.Tensor, groups: list, grid=L2_GRID, k: int = 5) -> tuple[float, dict]:
    """The grid's ``l2`` with the best cross-validated accuracy (ties: the larger ``l2``, the simpler probe),
    and the accuracy of every grid value. With fewer than 2 groups there is nothing to validate on: the
    largest ``l2``."""
    folds = folds_by_group(groups, k)
    if len(set(folds)) < 2:
        return max(grid), {}
    scores = {l2: cv_accuracy(diffs, folds, l2) for l2 in grid}
    return max(grid, key=lambda l2: (scores[l2], l2)), scores


def probe_weights(chosen: torch.Tensor, rejected: torch.Tensor, groups: list, grid=L2_GRID, k: int = 5
                  ) -> tuple[torch.Tensor, dict]:
    """Head weights ``w`` (D,) on raw features from pooled features of the pairs' chosen and rejected
    responses (P, D) each, and a summary (chosen ``l2``, cross-validated and training accuracy)."""
    std = torch.cat([chosen, rejected]).to(torch.float64).std(0).clamp(min=1e-6)  # the mean cancels in a pair
    diffs = (chosen.to(torch.float64) - rejected.to(torch.float64)) / std
    l2, scores = choose_l2(diffs, groups, grid, k)
    v = fit_bradley_terry(diffs, l2)
    summary = {"l2": l2, "cv_accuracy": scores.get(l2), "train_accuracy": float((diffs @ v > 0).double().mean())}
    return v / std, summary


def probe_feature_set(chosen: torch.Tensor, rejected: torch.Tensor, groups: list, narrow: int, grid=L2_GRID,
                      k: int = 5) -> tuple[torch.Tensor, dict]:
    """:func:`probe_weights` on the first ``narrow`` features and on all of them; the wider set is kept only if
    its cross-validated accuracy beats the narrower's by more than one standard error of the latter
    (``sqrt(a (1 - a) / P)`` over the P pairs: the one-standard-error rule, extra features must earn their
    place). Returns ``w`` (D,), zero beyond ``narrow`` when the narrower set is kept, and the summary of the
    kept fit with ``features`` (``"narrow"`` or ``"all"``) and both cross-validated accuracies."""
    w_narrow, narrow_summary = probe_weights(chosen[:, :narrow], rejected[:, :narrow], groups, grid, k)
    w_all, all_summary = probe_weights(chosen, rejected, groups, grid, k)
    a, b = narrow_summary["cv_accuracy"], all_summary["cv_accuracy"]
    both = {"cv_accuracy_narrow": a, "cv_accuracy_all": b}
    if beats(b, a, len(groups)):
        return w_all, {**all_summary, "features": "all", **both}
    padded = torch.cat([w_narrow, w_narrow.new_zeros(chosen.shape[1] - narrow)])
    return padded, {**narrow_summary, "features": "narrow", **both}


def beats(challenger: float | None, incumbent: float | None, n: int) -> bool:
    """Whether a cross-validated accuracy ``challenger`` beats ``incumbent`` by more than one standard error of the
    latter over ``n`` pairs, ``sqrt(a (1 - a) / n)`` (the one-standard-error rule); never when either is unknown."""
    if challenger is None or incumbent is None:
        return False
    return challenger - incumbent > (incumbent * (1 - incumbent) / n) ** 0.5


def choose_pooling(candidates: dict, groups: list, narrow: int, grid=L2_GRID, k: int = 5
                   ) -> tuple[str, torch.Tensor, dict]:
    """:func:`probe_feature_set` under each pooling of ``candidates`` (name -> (chosen, rejected) features, the
    incumbent first); another pooling replaces the incumbent only if its cross-validated accuracy beats the
    incumbent's by more than one standard error (:func:`beats`), the best such one if several do. Returns the
    chosen name, its head weights and its summary with ``pooling`` and every candidate's cross-validated accuracy
    (``cv_accuracy_by_pooling``)."""
    fits = {name: probe_feature_set(chosen, rejected, groups, narrow, grid, k)
            for name, (chosen, rejected) in candidates.items()}
    accuracy = {name: summary["cv_accuracy"] for name, (_, summary) in fits.items()}
    incumbent = next(iter(fits))
    better = [name for name in fits if beats(accuracy[name], accuracy[incumbent], len(groups))]
    name = max(better, key=lambda n: accuracy[n]) if better else incumbent
    weights, summary = fits[name]
    return name, weights, {**summary, "pooling": name, "cv_accuracy_by_pooling": accuracy}
