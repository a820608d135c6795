"""``share_prompt_pass``: the K samples of a prompt run its tokens once (one KV cache, repeated K times),
with the same log-probs and gradients as whole rows, on the full, trunk and reference passes."""
import pytest
import torch

from rlhf.models import lora_config
from rlhf.ppo.adapters import build_actor_critic
from rlhf.ppo.policy import POLICY
from rlhf.ppo.rollout import collect_rollout
from rlhf.ppo.scorers import TokenCountScorer
from rlhf.ppo.shared_prompt import groups_share_prompt, response_mask_4d
from rlhf.ppo.stage import run_ppo
from rlhf.ppo.sharding import mini_batch_rows
from test_ppo_stage import Capture, make_sft_adapter, ppo_config

NEG = torch.finfo(torch.float32).min


# pure pieces


def test_response_mask_by_hand():
    # one row: prompt [pad, a, b] (P = 3), response [c, pad]
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    got = response_mask_4d(mask, 3, torch.float32)
    assert got.shape == (1, 1, 2, 5)
    # query c (position 3) sees a, b, c; the pad query (position 4) sees a, b, c (its own key is a pad)
    want = torch.tensor([[NEG, 0, 0, 0, NEG],
                         [NEG, 0, 0, 0, NEG]])
    assert torch.equal(got[0, 0], want)
    # two response tokens: the first does not see the second
    got = response_mask_4d(torch.tensor([[1, 1, 1, 1]]), 2, torch.float32)[0, 0]
    assert torch.equal(got, torch.tensor([[0, 0, 0, NEG], [0, 0, 0, 0]]))


def test_groups_share_prompt():
    ids = torch.tensor([[0, 5, 6, 9], [0, 5, 6, 8], [7, 7, 1, 2], [7, 7, 1, 3]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert groups_share_prompt(mask, 3, 2, input_ids=ids)
    assert not groups_share_prompt(mask, 3, 4, input_ids=ids)       # rows 0 and 2 differ
    assert not groups_share_prompt(mask, 3, 3, input_ids=ids)       # 4 rows are not groups of 3
    assert not groups_share_prompt(mask, 3, 1, input_ids=ids)
    other = mask.clone()
    other[1, 0] = 1                                                  # same ids, other prompt mask
    assert not groups_share_prompt(other, 3, 2, input_ids=ids)
    assert groups_share_prompt(mask, 3, 2, inputs_embeds=ids[..., None].float().expand(4, 4, 2))


def test_a_mini_batch_keeps_groups_whole():
    order = mini_batch_rows(12, 3, 4, torch.Generator().manual_seed(1))[0]  # one mini-batch of all 4 groups
    assert sorted(order.tolist()) == list(range(12))
    for g in order.reshape(4, 3):
        assert g[0] % 3 == 0 and g.tolist() == [g[0], g[0] + 1, g[0] + 2]
    # group 1 is the plain row permutation (the order runs without shared prompts always had)
    assert torch.equal(mini_batch_rows(7, 1, 7, torch.Generator().manual_seed(4))[0],
                       torch.randperm(7, generator=torch.Generator().manual_seed(4)))


def test_mini_batches_on_two_processes_are_those_of_one():
    """12 rows in groups of 2 on one process, or 6 on each of two (process 1's rows 0-5 are rows 6-11 of the
    one-process rollout): each mini-batch of 2 groups holds the same rows either way. Worked by hand: seed 4
    orders the 6 groups 4, 5, 1, 2, 3, 0 (torch.randperm), so the mini-batches are groups (4, 5), (1, 2), (3, 0);
    process 0 holds groups 0-2, process 1 groups 3-5 (its local groups 0-2)."""
    assert torch.randperm(6, generator=torch.Generator().manual_seed(4)).tolist() == [4, 5, 1, 2, 3, 0]
    one = mini_batch_rows(12, 2, 2, torch.Generator().manual_seed(4))
    assert [b.tolist() for b in one] == [[8, 9, 10, 11], [2, 3, 4, 5], [6, 7, 0, 1]]
    rank0 = mini_batch_rows(6, 2, 2, torch.Generator().manual_seed(4), world=2, rank=0)
    rank1 = mini_batch_rows(6, 2, 2, torch.Generator().manual_seed(4), world=2, rank=1)
    assert [b.tolist() for b in rank0] == [[], [2, 3, 4, 5], [0, 1]]
    assert [b.tolist() for b in rank1] == [[2, 3, 4, 5], [], [0, 1]]
    # one process, groups of 1: the plain row order cut into mini-batches
    rows = mini_batch_rows(5, 1, 2, torch.Generator().manual_seed(4))
    assert torch.equal(torch.cat(rows), torch.randperm(5, generator=torch.Generator().manual_seed(4)))


# the actor's passes


def _actor(tiny_model_dir, sft_adapter=None, top_layers=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = len(base.model.layers)
    actor = build_actor_critic(base, sft_adapter=sft_adapter, value_model="none",
                               lora=lora_config(4, 8, 0.0, ["all-linear"], top_layers=top_layers,
                                                num_layers=n))
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in actor.peft.named_parameters():
            if f".{POLICY}." in name and "lora_B" in name and f"layers.{n - 1}." in name:
                p.normal_(0, 0.3)
    if top_layers:
        actor.freeze_policy_below(top_layers)
    return actor


def _groups():
    """2 prompts x 3 samples: left-padded prompts (P = 4), right-padded responses (R = 4)."""
    prompts = torch.tensor([[0, 5, 6, 7], [11, 12, 13, 14]])
    pmask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    resp = torch.tensor([[21, 22, 23, 24], [25, 26, 0, 0], [27, 0, 0, 0],
                         [31, 32, 33, 0], [34, 35, 36, 37], [38, 39, 0, 0]])
    rmask = (resp != 0).long()
    ids = torch.cat([prompts.repeat_interleave(3, 0), resp], 1)
    mask = torch.cat([pmask.repeat_interleave(3, 0), rmask], 1)
    return ids, mask, resp, rmask.bool()


class TokenCounter:
    """Counts the token positions block 0 runs."""

    def __init__(self, block):
        self.n = 0
        self.handle = block.register_forward_hook(self)

    def __call__(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        self.n += h.shape[0] * h.shape[1]


def test_grouped_passes_equal_whole_rows_and_run_each_prompt_once(tiny_model_dir):
    actor = _actor(tiny_model_dir)
    assert actor.shares_prompts
    ids, mask, resp, keep = _groups()
    count = TokenCounter(actor.decoder.layers[0])
    with torch.no_grad():
        whole = actor.policy_forward(ids, mask, resp, 0.8, with_entropy=True)
        assert count.n == 6 * 8
        count.n = 0
        shared = actor.policy_forward(ids, mask, resp, 0.8, with_entropy=True, group=3)
        assert count.n == 2 * 4 + 6 * 4                   # each prompt once, then the responses
        ref_whole = actor.reference_logprobs(ids, mask, resp, 0.8)
        ref_shared = actor.reference_logprobs(ids, mask, resp, 0.8, group=3)
    count.handle.remove()
    assert torch.allclose(shared["logprobs"][keep], whole["logprobs"][keep], atol=1e-5)
    assert torch.allclose(shared["entropy"][keep], whole["entropy"][keep], atol=1e-5)
    assert torch.allclose(ref_shared[keep], ref_whole[keep], atol=1e-5)
    assert (whole["logprobs"] - ref_whole)[keep].abs().max() > 1e-3   # policy and reference differ


def test_bf16_on_cpu_loads_with_eager_attention(tiny_model_dir):
    """Half precision on a CPU runs attention as plain products (torch's fused kernel is several times slower
    there); fp32 keeps the model's default."""
    from rlhf.models import load_base_model

    cpu = torch.device("cpu")
    assert load_base_model(tiny_model_dir, dtype=torch.bfloat16, device=cpu).config._attn_implementation == "eager"
    assert load_base_model(tiny_model_dir, dtype=torch.float32, device=cpu).config._attn_implementation != "eager"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bf16_models_share_prompts_too(tiny_model_dir, attention):
    """The start-up probe allows bf16's rounding (the two orders of work round apart), not a wrong result."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation=attention)
    actor = build_actor_critic(base, sft_adapter=None, value_model="none", lora=lora_config(4, 8, 0.0, ["all-linear"]))
    assert actor.shares_prompts
    ids, mask, _, _ = _groups()
    real = mask.bool()
    with torch.no_grad():
        whole = actor.hidden_states(ids, mask).float()
        shared = actor.hidden_states(ids, mask, group=3, prompt_length=4).float()
        moved = actor.hidden_states(ids, mask.roll(1, dims=1), group=3, prompt_length=4).float()  # wrong layout
    scale = whole[real].abs().max()
    assert (shared - whole)[real].abs().max() < 0.03 * scale
    assert (moved - whole)[real].abs().max() > 0.2 * scale


def test_grouped_gradients_equal_whole_rows(tiny_model_dir):
    actor = _actor(tiny_model_dir)
    ids, mask, resp, keep = _groups()
    weights = torch.randn(resp.shape, generator=torch.Generator().manual_seed(3))

    def grads(group):
        for p in actor.trainable_parameters():
            p.grad = None
        logp = actor.policy_forward(ids, mask, resp, 0.8, group=group)["logprobs"]
        (logp * weights * keep).sum().backward()
        return torch.cat([p.grad.flatten() for p in actor.trainable_parameters()])

    whole, shared = grads(1), grads(3)
    assert whole.abs().sum() > 0
    assert torch.allclose(shared, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_sft", [True, False])
def test_grouped_trunk_passes_equal_whole_rows(tiny_model_dir, tmp_path, with_sft):
    sft = str(make_sft_adapter(tiny_model_dir, tmp_path / "sft")) if with_sft else None
    actor = _actor(tiny_model_dir, sft_adapter=sft, top_layers=1)
    assert actor.policy_skip == 1 and actor.shares_prompts
    ids, mask, resp, keep = _groups()
    with torch.no_grad():
        trunk = actor.policy_trunk(ids, mask)
        trunk_shared = actor.policy_trunk(ids, mask, group=3, prompt_length=4)
        assert torch.allclose(trunk_shared[mask.bool()], trunk[mask.bool()], atol=1e-5)
        whole = actor.policy_forward(ids, mask, resp, 0.8, trunk=trunk)["logprobs"]
        shared = actor.policy_forward(ids, mask, resp, 0.8, trunk=trunk_shared, group=3)["logprobs"]
        ref_whole = actor.reference_logprobs(ids, mask, resp, 0.8, policy_trunk=trunk)
        ref_shared = actor.reference_logprobs(ids, mask, resp, 0.8, policy_trunk=trunk_shared, group=3)
    assert torch.allclose(shared[keep], whole[keep], atol=1e-5)
    assert torch.allclose(ref_shared[keep], ref_whole[keep], atol=1e-5)


def test_rows_that_do_not_share_a_prompt_run_whole(tiny_model_dir):
    actor = _actor(tiny_model_dir)
    ids, mask, resp, keep = _groups()
    ids[1, 2] = 40                                          # row 1's prompt is no longer row 0's
    count = TokenCounter(actor.decoder.layers[0])
    with torch.no_grad():
        whole = actor.policy_forward(ids, mask, resp, 0.8)["logprobs"]
        count.n = 0
        asked = actor.policy_forward(ids, mask, resp, 0.8, group=3)["logprobs"]
    count.handle.remove()
    assert count.n == 6 * 8
    assert torch.equal(asked, whole)


def test_rollout_with_groups_matches_the_rollout_without(tiny_model_dir):
    from rlhf.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    prompts = [[{"role": "user", "content": p}] for p in ("hello there", "a longer prompt than that one")]
    rows = [p for p in prompts for _ in range(3)]
    out = {}
    for group in (1, 3):
        actor = _actor(tiny_model_dir)
        torch.manual_seed(7)
        out[group] = collect_rollout(actor, tok, TokenCountScorer(range(10, 40)), rows, temperature=1.0,
                                     generate_kwargs={"do_sample": True, "max_new_tokens": 5, "top_k": 0},
                                     max_prompt_length=64, chunk=4, timings={}, group=group)
    a, b = out[1], out[3]
    assert torch.equal(a.response_ids, b.response_ids)     # the same samples
    m = a.response_mask.bool()
    assert torch.allclose(a.logprobs[m], b.logprobs[m], atol=1e-5)
    assert torch.allclose(a.ref_logprobs[m], b.ref_logprobs[m], atol=1e-5)


def test_one_ppo_step_trains_the_same_with_and_without_shared_prompts(tiny_model_dir, tmp_path):
    """One mini-batch, one epoch: the update is one gradient step on the same rollout either way."""
    weights, tokens = {}, {}

    class Counting(Capture):
        def __call__(self, actor, tokenizer):
            self.count = TokenCounter(actor.decoder.layers[0])
            return super().__call__(actor, tokenizer)

    for share in (False, True):
        capture = Counting(TokenCountScorer(range(10, 42)))
        cfg = ppo_config(tiny_model_dir, tmp_path / f"run_{share}", max_steps=1, rollout_batch_size=8,
                         samples_per_prompt=4, advantage_estimator="rloo", num_mini_batches=1, ppo_epochs=1,
                         share_prompt_pass=share, seed=3)
        run_ppo(cfg, scorer=capture)
        assert capture.actor.shares_prompts
        tokens[share] = capture.count.n
        named = capture.actor.named_trainable
        weights[share] = torch.cat([p.detach().flatten() for n, p in named if "lora_B" in n])
    assert tokens[True] < tokens[False]                     # the prompts ran once per group
    assert weights[True].abs().max() > 0                    # the fresh LoRA's B started at 0: it trained
    assert torch.allclose(weights[True], weights[False], rtol=1e-4, atol=1e-6)
