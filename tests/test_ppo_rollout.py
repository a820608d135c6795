"""Pure pieces of the rollout: score processing, the resumable prompt stream, targets."""
import torch

import pytest

from rlhf.errors import UserError
from rlhf.ppo.rollout import (
    PromptStream,
    Rollout,
    _pad_to,
    compute_targets,
    empty_responses,
    normalized_head,
    process_scores,
    resolve_normalization,
)

RAW = torch.tensor([1.0, 3.0, 5.0])
EOS = torch.tensor([True, False, True])


def test_process_scores_rm_stats_clip_then_penalty():
    # (raw - 3) / 2 = [-1, 0, 1]; clip 0.5 -> [-0.5, 0, 0.5]; row 1 has no EOS: + (-1)
    out = process_scores(RAW, EOS, normalization="rm_stats", stats={"mean": 3.0, "std": 2.0}, clip=0.5,
                         missing_eos_penalty=-1.0)
    assert torch.allclose(out, torch.tensor([-0.5, -1.0, 0.5]))


def test_process_scores_penalizes_empty_responses():
    # rm_stats -> [-1, 0, 1]; row 1 has no EOS: -1; rows 1 and 2 are empty: -0.5 each
    empty = empty_responses(["Paris.", "  \n", ""])
    assert empty.tolist() == [False, True, True]
    out = process_scores(RAW, EOS, normalization="rm_stats", stats={"mean": 3.0, "std": 2.0}, clip=None,
                         missing_eos_penalty=-1.0, empty=empty, empty_response_penalty=-0.5)
    assert torch.allclose(out, torch.tensor([-1.0, -1.5, 0.5]))
    off = process_scores(RAW, EOS, normalization="rm_stats", stats={"mean": 3.0, "std": 2.0}, clip=None,
                         missing_eos_penalty=-1.0, empty=empty, empty_response_penalty=None)
    assert torch.allclose(off, torch.tensor([-1.0, -1.0, 1.0]))


def test_normalized_head_predicts_the_normalised_score():
    # w = [2, 4], b = 1, mean 3, std 2: w' = [1, 2], b' = (1 - 3) / 2 = -1
    w, b = normalized_head(torch.tensor([[2.0, 4.0]]), torch.tensor([1.0]), {"mean": 3.0, "std": 2.0})
    assert torch.equal(w, torch.tensor([[1.0, 2.0]])) and torch.equal(b, torch.tensor([-1.0]))
    h = torch.tensor([0.5, 1.0])                      # raw score 2*0.5 + 4*1 + 1 = 6 -> (6 - 3) / 2 = 1.5
    assert float(w @ h + b) == 1.5
    _, b0 = normalized_head(torch.tensor([[2.0, 4.0]]), None, {"mean": 3.0, "std": 2.0})
    assert torch.equal(b0, torch.tensor([-1.5]))      # no bias: (0 - 3) / 2


def test_resolve_normalization():
    assert resolve_normalization("auto", {"mean": 0.0, "std": 1.0}) == "rm_stats"
    assert resolve_normalization("auto", None) == "none"
    assert resolve_normalization("batch", None) == "batch"
    with pytest.raises(UserError, match="rm_stats"):
        resolve_normalization("rm_stats", None)


def test_process_scores_batch_and_none():
    # batch: mean 3, unbiased std 2 -> [-1, 0, 1]
    out = process_scores(RAW, EOS, normalization="batch", stats=None, clip=None, missing_eos_penalty=None)
    assert torch.allclose(out, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    out = process_scores(RAW, EOS, normalization="none", stats=None, clip=4.0, missing_eos_penalty=None)
    assert torch.equal(out, torch.tensor([1.0, 3.0, 4.0]))
    assert torch.equal(RAW, torch.tensor([1.0, 3.0, 5.0]))          # input not mutated


def test_prompt_stream_covers_each_epoch_and_resumes():
    s = PromptStream(5, 2, seed=3)
    batches = [s.next_indices() for _ in range(5)]                  # 10 indices = 2 epochs of 5
    flat = sum(batches, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
    s2 = PromptStream(5, 2, seed=3)
    for _ in range(3):
        s2.next_indices()
    state = s2.state_dict()
    s3 = PromptStream(5, 2, seed=3)
    s3.load_state_dict(state)
    assert [s3.next_indices() for _ in range(2)] == batches[3:]


def test_pad_to_left_and_right():
    t = torch.tensor([[1, 2]])
    assert _pad_to(t, 4, 0, left=True).tolist() == [[0, 0, 1, 2]]
    assert _pad_to(t, 3, 9, left=False).tolist() == [[1, 2, 9]]
    assert _pad_to(t, 2, 9, left=False) is t


def test_compute_targets_reward_at_last_token_and_whitening():
    B, R = 2, 3
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    zeros = torch.zeros(B, R)
    r = Rollout(prompts=[], responses=[], input_ids=torch.zeros(B, 5, dtype=torch.long),
                attention_mask=torch.ones(B, 5, dtype=torch.long), response_ids=torch.zeros(B, R, dtype=torch.long),
                response_mask=mask, has_eos=torch.tensor([True, False]), logprobs=zeros.clone(),
                ref_logprobs=zeros.clone(), values=zeros.clone(), entropy=zeros.clone(), raw_scores=torch.zeros(B))
    compute_targets(r, torch.tensor([1.0, 2.0]), kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0,
                    whiten_advantages=False)
    # KL = 0 and V = 0, gamma = lam = 1: every token's advantage is its row's score
    assert torch.equal(r.rewards, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
    assert torch.equal(r.advantages, torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]))
    assert torch.equal(r.returns, r.advantages)
    compute_targets(r, torch.tensor([1.0, 2.0]), kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0,
                    whiten_advantages=True)
    m = mask.bool()
    assert abs(float(r.advantages[m].mean())) < 1e-6 and float(r.advantages[~m].abs().sum()) == 0.0


def test_select_drops_columns_that_are_padding_in_all_selected_rows():
    zeros = torch.zeros(3, 3)
    r = Rollout(prompts=[], responses=[],
                input_ids=torch.tensor([[0, 0, 7, 1, 2, 0], [0, 5, 7, 3, 0, 0], [6, 5, 7, 4, 4, 4]]),
                attention_mask=torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
                response_ids=torch.tensor([[1, 2, 0], [3, 0, 0], [4, 4, 4]]),
                response_mask=torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1]]), has_eos=torch.ones(3).bool(),
                logprobs=zeros, ref_logprobs=zeros, values=zeros, entropy=zeros, raw_scores=torch.zeros(3),
                advantages=zeros, returns=zeros)
    d = r.select(torch.tensor([1, 0]))
    assert d["input_ids"].tolist() == [[5, 7, 3, 0], [0, 7, 1, 2]]      # prompt col 0 and response col 2 dropped
    assert d["response_ids"].tolist() == [[3, 0], [1, 2]] and d["logprobs"].shape == (2, 2)
    assert r.select(torch.tensor([2]))["input_ids"].shape == (1, 6)


def _six_rollouts():
    """2 prompts x 3 samples, 2 response tokens each (the last row stops after one token)."""
    B, R = 6, 2
    mask = torch.ones(B, R)
    mask[5, 1] = 0.0
    logp = torch.zeros(B, R)
    ref = torch.zeros(B, R)
    ref[0, 0] = -1.0          # k1 = logp - ref = 1 at row 0, token 0; 0 elsewhere
    return Rollout(prompts=[], responses=[], input_ids=torch.zeros(B, 4, dtype=torch.long),
                   attention_mask=torch.ones(B, 4, dtype=torch.long), response_ids=torch.zeros(B, R, dtype=torch.long),
                   response_mask=mask, has_eos=torch.ones(B, dtype=torch.bool), logprobs=logp, ref_logprobs=ref,
                   values=None, entropy=torch.zeros(B, R), raw_scores=torch.zeros(B))


SIX = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])


def test_rloo_targets_by_hand():
    r = compute_targets(_six_rollouts(), SIX, kl_coef=0.5, kl_estimator="k1", gamma=1.0, lam=1.0,
                        whiten_advantages=False, estimator="rloo", group_size=3)
    # leave-one-out scores (-3, -1.5, 4.5, -3, 1.5, 1.5) at each row's last token; row 0 token 0 pays 0.5 * 1
    # return-to-go: row 0 = (-0.5 - 3, -3) ; rows 1-4 = (a, a); row 5 = (1.5, 0)
    expected = [[-3.5, -3.0], [-1.5, -1.5], [4.5, 4.5], [-3.0, -3.0], [1.5, 1.5], [1.5, 0.0]]
    assert torch.allclose(r.advantages, torch.tensor(expected))
    assert torch.allclose(r.returns, r.advantages) and r.scores is not None and torch.equal(r.scores, SIX)
    w = compute_targets(_six_rollouts(), SIX, kl_coef=0.5, kl_estimator="k1", gamma=1.0, lam=1.0,
                        whiten_advantages=True, estimator="rloo", group_size=3)
    flat = torch.tensor([-3.5, -3.0, -1.5, -1.5, 4.5, 4.5, -3.0, -3.0, 1.5, 1.5, 1.5])   # the 11 response tokens
    # scaled by the std over the batch's tokens, not re-centred: the leave-one-out baseline has centred them
    assert torch.allclose(w.advantages[w.response_mask.bool()], flat / flat.std(), atol=1e-5)
    assert float(w.advantages[5, 1]) == 0.0


def test_grpo_and_dr_grpo_targets_by_hand():
    r = compute_targets(_six_rollouts(), SIX, kl_coef=0.0, kl_estimator="k1", gamma=1.0, lam=1.0,
                        whiten_advantages=True, estimator="grpo", group_size=3, grpo_scale_std=False)
    # Dr. GRPO: centred only, (-2, -1, 3, -2, 1, 1), the same at every token of a row
    expected = [[-2.0, -2.0], [-1.0, -1.0], [3.0, 3.0], [-2.0, -2.0], [1.0, 1.0], [1.0, 0.0]]
    assert torch.allclose(r.advantages, torch.tensor(expected))
    r = compute_targets(_six_rollouts(), SIX, kl_coef=0.0, kl_estimator="k1", gamma=1.0, lam=1.0,
                        whiten_advantages=True, estimator="grpo", group_size=3)
    assert abs(float(r.advantages[2, 0]) - 3 / (7 ** 0.5 + 1e-4)) < 1e-5


def test_reinforce_pp_whitens_the_kl_shaped_return_over_the_batch():
    r = compute_targets(_six_rollouts(), SIX, kl_coef=0.5, kl_estimator="k1", gamma=1.0, lam=1.0,
                        whiten_advantages=False, estimator="reinforce_pp", group_size=3)
    # returns: row 0 (0.5, 1), then (2, 2), (6, 6), (0, 0), (3, 3), (3, -): 11 tokens
    ret = torch.tensor([0.5, 1, 2, 2, 6, 6, 0, 0, 3, 3, 3])
    assert torch.allclose(r.returns[r.response_mask.bool()], ret)
    whitened = (ret - ret.mean()) / ret.std()   # masked mean and unbiased std over all 11 tokens
    assert torch.allclose(r.advantages[r.response_mask.bool()], whitened, atol=1e-5)
    assert float(r.advantages[5, 1]) == 0.0


def test_kl_in_loss_leaves_the_rewards_unpenalised():
    r = compute_targets(_six_rollouts(), SIX, kl_coef=0.5, kl_estimator="k3", gamma=1.0, lam=1.0,
                        whiten_advantages=False, estimator="rloo", group_size=3, kl_in="loss")
    assert float(r.advantages[0, 0]) == -3.0          # no penalty in the reward
    assert float(r.kl[0, 0]) > 0                      # but the KL is still measured (k3 of d = -1)
