"""Hand-computed checks for rlhf/ppo/losses.py (tiny tensors, arithmetic in comments)."""
import math

import pytest
import torch

from rlhf.ppo import losses as L


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=tol)


# ----------------------------------------------------------- masked statistics
# Masked entries are 1, 3, 5 (row 0: 1, 3; row 1: 5); the rest must be ignored.
X = torch.tensor([[1.0, 3.0, 99.0], [5.0, -7.0, 42.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean():
    close(L.masked_sum(X, M), 9.0)                       # 1 + 3 + 5
    close(L.masked_sum(X, M, dim=1), [4.0, 5.0])         # [1+3, 5]
    close(L.masked_mean(X, M), 3.0)                      # 9 / 3
    close(L.masked_mean(X, M, dim=1), [2.0, 5.0])        # [4/2, 5/1]
    close(L.masked_mean(X, M, dim=0), [3.0, 3.0, 0.0])   # [(1+5)/2, 3/1, empty -> 0]


def test_masked_reductions_ignore_inf_in_masked_positions():
    x = X.clone()
    x[0, 2] = float("inf")
    x[1, 1] = float("nan")
    close(L.masked_mean(x, M), 3.0)
    close(L.masked_var(x, M), 4.0)


def test_masked_mean_empty_mask_is_zero():
    close(L.masked_mean(X, torch.zeros_like(M)), 0.0)


def test_masked_var():
    # deviations from 3: -2, 0, 2 -> squares sum 8
    close(L.masked_var(X, M, unbiased=False), 8.0 / 3.0)   # 8 / n
    close(L.masked_var(X, M, unbiased=True), 4.0)          # 8 / (n - 1)
    # single entry: unbiased factor falls back to 1 -> variance 0, not NaN
    close(L.masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]])), 0.0)


def test_masked_whiten():
    # (x - 3) / sqrt(4 + 1e-8): 1 -> -1, 3 -> 0, 5 -> 1; unmasked -> 0
    w = L.masked_whiten(X, M)
    close(w, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], tol=1e-6)
    # shift_mean=False adds the mean 3 back on masked entries
    w2 = L.masked_whiten(X, M, shift_mean=False)
    close(w2, [[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]], tol=1e-6)
    close(L.masked_mean(w, M), 0.0)
    close(L.masked_var(w, M), 1.0, tol=1e-6)


def test_masked_rescale_keeps_signs():
    # masked entries 1, 3, 5 (var 4): divided by 2, not re-centred; unmasked -> 0
    r = L.masked_rescale(X, M)
    close(r, [[0.5, 1.5, 0.0], [2.5, 0.0, 0.0]], tol=1e-6)
    close(L.masked_var(r, M), 1.0, tol=1e-6)


# --------------------------------------------------------------- KL estimators
def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    close(L.kl_k1(logp, ref), [0.5, -1.0])                 # logp - ref
    close(L.kl_k2(logp, ref), [0.125, 0.5])                # 0.5 * [0.25, 1]
    # d = ref - logp = [-0.5, 1.0]; exp(d) - 1 - d
    close(L.kl_k3(logp, ref), [math.exp(-0.5) - 1 + 0.5,  # 0.1065307
                               math.e - 1 - 1.0])          # 0.7182818
    close(L.kl_k3(logp, ref), [0.10653066, 0.71828183], tol=1e-6)
    assert (L.kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


# -------------------------------------------------------------- reward shaping
def test_shape_rewards_k1():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -4.0], [-1.0, -2.0, -0.5]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = L.shape_rewards(score, logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref = [[0.5, -1, (1, masked)], [0, 1, -0.5]]
    close(kl, [[0.5, -1.0, 0.0], [0.0, 1.0, -0.5]])
    # row 0: [-0.05, 0.1 + score 2 (last valid t=1), 0]
    # row 1: [0, -0.1, 0.05 + score -1 (last valid t=2)]
    close(rewards, [[-0.05, 2.1, 0.0], [0.0, -0.1, -0.95]])


def test_shape_rewards_k3_and_empty_row():
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    score = torch.tensor([3.0, 5.0])
    rewards, kl = L.shape_rewards(score, logp, ref, mask, kl_coef=0.5, kl_estimator="k3")
    k3 = math.e - 1 - 1                                    # d = 1: e - 2
    close(kl, [[k3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: -0.5 * k3 + 3 at t=0; row 1 is empty -> its score lands nowhere
    close(rewards, [[-0.5 * k3 + 3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_shape_rewards_bad_estimator():
    with pytest.raises(ValueError):
        L.shape_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2),
                        torch.ones(1, 2), 0.1, kl_estimator="k4")


# ------------------------------------------------------------------------- GAE
def test_gae_hand_1x3():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    g, lam = 0.9, 0.8                                      # g * lam = 0.72
    adv, ret = L.compute_gae(r, v, torch.ones(1, 3), g, lam)
    # t=2: delta = 2 + 0.9*0 - 1.5 = 0.5               A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35            A1 = 0.35 + 0.72*0.5 = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4             A0 = 1.4 + 0.72*0.71 = 1.9112
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[2.4112, 1.71, 2.0]])                      # A + V


def test_gae_hand_ragged():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = L.compute_gae(r, v, torch.tensor([[1, 1, 0]]), 0.9, 0.8)
    # episode ends at t=1, V after it counts as 0, t=2 ignored
    # t=1: delta = 0 + 0 - 1.0 = -1                    A1 = -1
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4             A0 = 1.4 + 0.72*(-1) = 0.68
    close(adv, [[0.68, -1.0, 0.0]])
    close(ret, [[1.18, 0.0, 0.0]])


def _gae_reference(rewards, values, lengths, gamma, lam):
    """Plain-Python reverse loop, one row at a time, over the first `length` tokens."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    return adv, ret


@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (3, 4), (4, 7), (8, 16)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_reference(B, T, gamma, lam):
    gen = torch.Generator().manual_seed(1000 * B + T)
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=gen).tolist()
    lengths[0] = T                                          # always one full row
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    adv, ret = L.compute_gae(r, v, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(r.tolist(), v.tolist(), lengths, gamma, lam)
    close(adv, ref_adv, tol=1e-10)
    close(ret, ref_ret, tol=1e-10)


def test_gae_outputs_are_detached():
    v = torch.randn(2, 3, requires_grad=True)
    adv, ret = L.compute_gae(torch.randn(2, 3), v, torch.ones(2, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------- policy loss
def test_policy_loss_clipping():
    # ratios r and advantages A, eps = 0.2, last token masked out
    r = torch.tensor([[1.5, 0.5, 1.1, 0.5, 10.0]])
    A = torch.tensor([[1.0, 1.0, -1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logp = torch.log(r).requires_grad_(True)
    old = torch.zeros(1, 5)
    loss, stats = L.policy_loss(logp, old, A, mask, clip_range=0.2)
    # tok1 r=1.5 A=1:  max(-1.5, -1.2) = -1.2   clip binds
    # tok2 r=0.5 A=1:  max(-0.5, -0.8) = -0.5   clip does not bind
    # tok3 r=1.1 A=-1: max( 1.1,  1.1) =  1.1   inside range
    # tok4 r=0.5 A=-2: max( 1.0,  1.6) =  1.6   clip binds
    # loss = (-1.2 - 0.5 + 1.1 + 1.6) / 4 = 0.25
    close(loss, 0.25, tol=1e-6)
    close(stats["clipfrac"], 0.5)                         # 2 of 4
    close(stats["ratio_max"], 1.5)                        # masked 10.0 ignored
    # approx_kl = mean(r - 1 - ln r)
    kl = [1.5 - 1 - math.log(1.5), 0.5 - 1 - math.log(0.5),
          1.1 - 1 - math.log(1.1), 0.5 - 1 - math.log(0.5)]
    close(stats["approx_kl"], sum(kl) / 4, tol=1e-6)     # ~0.121380
    # gradient dloss/dlogp = -A*r/4 where unclipped term is active, else 0
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0]], tol=1e-6)
    assert not stats["clipfrac"].requires_grad


def test_policy_loss_no_clipping_at_ratio_one():
    A = torch.tensor([[1.0, -3.0], [2.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    lp = torch.tensor([[-0.3, -1.2], [-2.0, -0.1]])
    loss, stats = L.policy_loss(lp, lp.clone(), A, mask, clip_range=0.2)
    close(loss, -(1.0 - 3.0 + 2.0) / 3)                   # -mean(A) = 0
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_max"], 1.0)


# ------------------------------------------------------------------ value loss
def test_value_loss_clipping():
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    v = torch.tensor([[1.5, 1.1, 0.5, 1.5, 9.0]])
    R = torch.tensor([[2.0, 0.0, 0.6, 0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = L.value_loss(v, old, R, mask, clip_range_value=0.2)
    # tok1 v=1.5 vc=1.2 R=2:   max(0.25, 0.64) = 0.64   clipped larger
    # tok2 v=1.1 vc=1.1 R=0:   max(1.21, 1.21) = 1.21   equal -> not counted
    # tok3 v=0.5 vc=0.8 R=0.6: max(0.01, 0.04) = 0.04   clipped larger
    # tok4 v=1.5 vc=1.2 R=0.5: max(1.00, 0.49) = 1.00   unclipped larger
    # loss = 0.5 * (0.64 + 1.21 + 0.04 + 1.00) / 4 = 0.36125
    close(loss, 0.36125, tol=1e-6)
    close(stats["vf_clipfrac"], 0.5)


# ------------------------------------------------------- logits-derived values
def test_entropy_uniform_is_log_v():
    close(L.entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)))
    # shift-invariant and stable for huge logits
    close(L.entropy_from_logits(torch.full((1, 1, 7), 1e4)), [[math.log(7)]], tol=1e-5)


def test_entropy_known_distribution_and_neg_inf():
    p = torch.tensor([[[0.5, 0.25, 0.25]]])
    # H = 0.5 ln 2 + 0.25 ln 4 + 0.25 ln 4 = 1.5 ln 2
    close(L.entropy_from_logits(p.log()), [[1.5 * math.log(2)]])
    close(L.entropy_from_logits(torch.tensor([[[0.0, -float("inf")]]])), [[0.0]])


def test_entropy_gradient_by_hand():
    # dH/dz_i = -p_i (z_i - sum_j p_j z_j). p = (0.5, 0.25, 0.25), z = log p:
    # zbar = 0.5 ln .5 + 0.5 ln .25 = -1.03972; dH/dz = (-0.5 * 0.34657, 0.25 * 0.34657, 0.25 * 0.34657)
    z = torch.tensor([[[0.5, 0.25, 0.25]]]).log().requires_grad_(True)
    L.entropy_from_logits(z).sum().backward()
    close(z.grad, [[[-0.173287, 0.086643, 0.086643]]], tol=1e-5)
    # a -inf logit (probability 0) gets a zero, finite gradient and leaves the others' alone
    z = torch.tensor([[[0.0, 0.0, -float("inf")]]], requires_grad=True)
    L.entropy_from_logits(z).sum().backward()
    assert torch.isfinite(z.grad).all()
    close(z.grad, [[[0.0, 0.0, 0.0]]])   # uniform over the two finite entries: the maximum, gradient 0


def test_logprobs_from_logits():
    logits = torch.tensor([[[0.5, 0.25, 0.25]]]).log() + 3.0   # shift must not matter
    close(L.logprobs_from_logits(logits, torch.tensor([[0]])), [[math.log(0.5)]])
    close(L.logprobs_from_logits(logits, torch.tensor([[2]])), [[math.log(0.25)]])
    z = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(0))
    lab = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(1))
    ref = torch.log_softmax(z, -1).gather(-1, lab[..., None]).squeeze(-1)
    close(L.logprobs_from_logits(z, lab), ref)


def test_explained_variance():
    R = torch.tensor([[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # R = [1, 3, 5] var 4; R - V = [0, 0, 2]: mean 2/3, squares 4/9+4/9+16/9 = 24/9,
    # unbiased 24/9 / 2 = 4/3 -> 1 - (4/3)/4 = 2/3
    V = torch.tensor([[1.0, 3.0, -50.0], [3.0, 0.0, 0.0]])
    close(L.explained_variance(V, R, mask), 2.0 / 3.0)
    close(L.explained_variance(R, R, mask), 1.0)
    close(L.explained_variance(torch.zeros_like(R), R, mask), 0.0)


# -------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller():
    c = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.0, 256)                                    # error 0 -> unchanged
    close(c.value, 0.1)
    c.update(12.0, 256)                                   # 12/6-1 = 1 -> clip 0.2
    close(c.value, 0.1 * (1 + 0.2 * 256 / 10000))         # 0.100512
    c2 = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c2.update(3.0, 256)                                   # -0.5 -> clip -0.2
    close(c2.value, 0.1 * (1 - 0.2 * 256 / 10000))        # 0.099488
    c3 = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c3.update(torch.tensor(6.6), 256)                     # 0.1, inside the clip
    close(c3.value, 0.1 * (1 + 0.1 * 256 / 10000))        # 0.100256


def test_kl_controller_state_dict_round_trip():
    c = L.make_kl_controller("adaptive", 0.2, target=4.0, horizon=500)
    c.update(10.0, 64)
    d = c.state_dict()
    fresh = L.make_kl_controller("adaptive", 999.0, target=1.0, horizon=1)
    fresh.load_state_dict(d)
    assert fresh.state_dict() == d
    c.update(2.0, 32)
    fresh.update(2.0, 32)
    assert fresh.value == c.value

    f = L.make_kl_controller("fixed", 0.05)
    f.update(100.0, 1000)
    assert f.value == 0.05
    g = L.FixedKLController(1.0)
    g.load_state_dict(f.state_dict())
    assert g.value == 0.05


def test_make_kl_controller_errors():
    assert isinstance(L.make_kl_controller("fixed", 0.1), L.FixedKLController)
    with pytest.raises(ValueError):
        L.make_kl_controller("adaptive", 0.1)              # no target
    with pytest.raises(ValueError):
        L.make_kl_controller("pid", 0.1, target=6.0)


# -------------------------------------------------------------------- EOS mask
def test_eos_truncation_mask():
    EOS, PAD = 2, 0
    ids = torch.tensor([
        [5, 2, 7, 2],   # EOS at 1 -> keep through it, drop after
        [5, 6, 0, 0],   # no EOS: trailing pads dropped
        [5, 0, 6, 0],   # no EOS: interior pad kept, trailing pad dropped
        [2, 0, 0, 0],   # EOS first
        [0, 0, 0, 0],   # all pad, no EOS -> empty
        [5, 6, 7, 8],   # no EOS, no pad (truncated at max length)
    ])
    mask, has_eos = L.eos_truncation_mask(ids, EOS, PAD)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                             [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False, False, True, False, False]
    assert has_eos.dtype == torch.bool


def test_eos_truncation_mask_pad_equals_eos():
    mask, has_eos = L.eos_truncation_mask(torch.tensor([[5, 6, 0, 0]]), 0, 0)
    assert mask.tolist() == [[1, 1, 1, 0]]                 # first pad is the EOS
    assert has_eos.tolist() == [True]


def test_penalize_missing_eos():
    scores = torch.tensor([1.0, 2.0, 3.0])
    out = L.penalize_missing_eos(scores, torch.tensor([True, False, False]), -1.0)
    close(out, [1.0, 1.0, 2.0])                           # -1 added to rows 1, 2
    close(scores, [1.0, 2.0, 3.0])


# ----------------------------------------------------------- no input mutation
def test_inputs_not_mutated():
    gen = torch.Generator().manual_seed(7)
    B, T, V = 3, 4, 6
    t = {k: torch.randn(B, T, generator=gen) for k in
         ["logp", "ref", "old", "adv", "val", "oldv", "ret", "rew"]}
    t["score"] = torch.randn(B, generator=gen)
    t["mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    t["logits"] = torch.randn(B, T, V, generator=gen)
    t["labels"] = torch.randint(0, V, (B, T), generator=gen)
    t["ids"] = torch.tensor([[4, 2, 3, 0], [4, 5, 0, 0], [0, 0, 0, 0]])
    before = {k: v.clone() for k, v in t.items()}

    L.masked_whiten(t["val"], t["mask"], shift_mean=False)
    L.masked_var(t["val"], t["mask"])
    for est in ("k1", "k2", "k3"):
        L.shape_rewards(t["score"], t["logp"], t["ref"], t["mask"], 0.1, est)
    L.compute_gae(t["rew"], t["val"], t["mask"], 0.99, 0.95)
    L.policy_loss(t["logp"], t["old"], t["adv"], t["mask"], 0.2)
    L.value_loss(t["val"], t["oldv"], t["ret"], t["mask"], 0.2)
    L.entropy_from_logits(t["logits"])
    L.logprobs_from_logits(t["logits"], t["labels"])
    L.explained_variance(t["val"], t["ret"], t["mask"])
    _, has = L.eos_truncation_mask(t["ids"], 2, 0)
    L.penalize_missing_eos(t["score"], has, -1.0)

    for k in t:
        assert torch.equal(t[k], before[k]), k


# ------------------------------------------------- critic-free estimators
# 2 prompts x 3 samples: rows 0-2 answer prompt 0, rows 3-5 prompt 1
SCORES = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])


def test_rloo_scores_by_hand():
    # group 0 sum 9: 1 - 8/2 = -3, 2 - 7/2 = -1.5, 6 - 3/2 = 4.5; group 1 sum 6: 0 - 6/2 = -3, 3 - 3/2 = 1.5 (x2)
    close(L.rloo_scores(SCORES, 3), [-3.0, -1.5, 4.5, -3.0, 1.5, 1.5])
    with pytest.raises(ValueError):
        L.rloo_scores(SCORES, 1)
    with pytest.raises(ValueError):
        L.rloo_scores(SCORES, 4)   # 6 rows are not groups of 4


def test_grpo_scores_by_hand():
    # group 0: mean 3, deviations (-2, -1, 3), unbiased var 14 / 2 = 7; group 1: mean 2, (-2, 1, 1), var 6 / 2 = 3
    s7, s3 = math.sqrt(7) + 1e-4, math.sqrt(3) + 1e-4
    close(L.grpo_scores(SCORES, 3), [-2 / s7, -1 / s7, 3 / s7, -2 / s3, 1 / s3, 1 / s3], tol=1e-6)
    close(L.grpo_scores(SCORES, 3, scale_std=False), [-2.0, -1.0, 3.0, -2.0, 1.0, 1.0])   # Dr. GRPO
    # a group whose samples all score the same gives 0 advantage, not NaN
    close(L.grpo_scores(torch.tensor([2.0, 2.0, 2.0]), 3), [0.0, 0.0, 0.0])


def test_returns_to_go_by_hand():
    r = torch.tensor([[0.1, -0.2, 1.0], [0.5, 2.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 1: row 0 (0.9, 0.8, 1.0); row 1: the masked 9.0 is ignored -> (2.5, 2.0, 0)
    close(L.returns_to_go(r, m, 1.0), [[0.9, 0.8, 1.0], [2.5, 2.0, 0.0]])
    # gamma 0.5: row 0 t1 = -0.2 + 0.5 = 0.3, t0 = 0.1 + 0.15 = 0.25; row 1 t0 = 0.5 + 1.0 = 1.5
    close(L.returns_to_go(r, m, 0.5), [[0.25, 0.3, 1.0], [1.5, 2.0, 0.0]])


def test_kl_penalty_loss_by_hand_and_refuses_k1():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    # k3 with d = ref - logp = (-ln 2, 0): exp(-ln 2) - 1 + ln 2 = 0.5 - 1 + 0.693147 = 0.193147, and 0
    loss = L.kl_penalty_loss(logp, ref, torch.ones(1, 2), "k3")
    close(loss, 0.193147 / 2, tol=1e-6)
    loss.backward()
    # d/dlogp of exp(ref - logp) - 1 - (ref - logp) = 1 - exp(ref - logp): (1 - 0.5, 0), / 2 for the mean
    close(logp.grad, [[0.25, 0.0]], tol=1e-6)
    with pytest.raises(ValueError):
        L.kl_penalty_loss(logp, ref, torch.ones(1, 2), "k1")
