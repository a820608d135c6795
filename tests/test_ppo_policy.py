"""One base model for policy, reference, value and reward; rollout log-probs; the real RM wiring."""
from pathlib import Path

import pytest
import torch

from rlhf.errors import UserError
from rlhf.ppo import wiring
from rlhf.models import lora_config
from rlhf.ppo.adapters import build_actor_critic
from rlhf.ppo.policy import POLICY, REFERENCE, VALUE
from rlhf.ppo.rollout import collect_rollout
from rlhf.ppo.scorers import ScoreInput, TokenCountScorer, TokenScorer
from rlhf.ppo.stage import run_ppo
from test_ppo_stage import make_sft_adapter, ppo_config


def train_tiny_reward_model(tiny_model_dir, folder, **overrides):
    """A tiny reward model trained for a few steps by `rlhf reward`."""
    from reward import train
    from rlhf.testing import write_jsonl

    rows = [{"prompt": f"Say something {i}.", "chosen": "sun river thanks", "rejected": "sun river"} for i in range(16)]
    values = dict(
        model_name_or_path=tiny_model_dir, dataset_name=str(write_jsonl(folder / "prefs.jsonl", rows)),
        output_dir=str(folder / "rm"), max_steps=3, learning_rate=5e-3, per_device_train_batch_size=8,
        eval_fraction=0.25, lora_r=4, lora_alpha=8, report_to="none", stats_max_pairs=8,
    )
    train.run_reward(train.RewardStageConfig(**{**values, **overrides}))
    return folder / "rm"


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    return train_tiny_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def reward_dir_response(tiny_model_dir, tmp_path_factory):
    """A reward model whose head reads the response's positions (its states' mean, its embeddings' max)."""
    return train_tiny_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm_response"), pooling="response")


def _built(tiny_model_dir, tmp_path, reward_dir):
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_tokenizer

    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", sft_adapter=str(sft), reward_model=str(reward_dir))
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.data_ptr() for n, p in base.named_parameters()}
    actor = build_actor_critic(base, sft_adapter=str(sft), lora=lora_config(4, 8, 0.0, ["all-linear"]),
                               base_name_or_path=str(Path(tiny_model_dir).resolve()))
    scorer = wiring.load_reward_scorer(cfg, actor, tokenizer, str(Path(tiny_model_dir).resolve()))
    wiring.init_value_model(cfg, actor, scorer)
    return cfg, tokenizer, actor, scorer, before


def test_policy_reference_value_and_reward_share_base_storage(tiny_model_dir, tmp_path, reward_dir):
    cfg, tokenizer, actor, scorer, before = _built(tiny_model_dir, tmp_path, reward_dir)
    assert isinstance(scorer, TokenScorer)                       # attached, not a second model
    assert set(actor.peft.peft_config) == {POLICY, REFERENCE, VALUE, "reward"}

    # every non-adapter parameter is the original base tensor (same storage), none was copied
    base_params = {n: p for n, p in actor.peft.named_parameters() if "lora_" not in n}
    assert len(base_params) == len(before)
    assert {p.data_ptr() for p in base_params.values()} == set(before.values())
    assert scorer.rm.trunk is actor.decoder

    # each role's forward runs through the very same base weight, with its own adapter active
    layer = actor.decoder.layers[0].self_attn.q_proj
    seen = []
    hook = layer.base_layer.register_forward_hook(
        lambda mod, inp, out: seen.append((mod.weight.data_ptr(), tuple(layer.active_adapters))))
    ids = torch.tensor([[3, 7, 11, 13, 17, 19], [0, 0, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    resp = ids[:, -2:]
    actor.policy_forward(ids, mask, resp, 1.0)
    actor.reference_logprobs(ids, mask, resp, 1.0)
    actor.value_forward(ids, mask, 4)
    scorer.score_batch(ScoreInput([], [], ids, mask, resp, torch.ones_like(resp), 4))
    hook.remove()
    ptr = before["model.layers.0.self_attn.q_proj.weight"]
    assert seen == [(ptr, (POLICY,)), (ptr, (REFERENCE,)), (ptr, (VALUE,)), (ptr, ("reward",))]

    # trainable: policy + value adapters and the value head only; scoring left the flags alone
    names = [n for n, p in actor.peft.named_parameters() if p.requires_grad]
    assert names and all(".policy." in n or ".value." in n for n in names)


def test_value_model_starts_from_the_reward_model(tiny_model_dir, tmp_path, reward_dir):
    cfg, tokenizer, actor, scorer, _ = _built(tiny_model_dir, tmp_path, reward_dir)
    weight, _ = scorer.rm.head_weight()
    stats = scorer.stats
    assert stats["std"] != 1.0 and stats["mean"] != 0.0      # the RM saved real statistics
    assert torch.allclose(actor.value_head.weight, weight.float() / stats["std"])
    ids = torch.tensor([[3, 7, 11, 13, 17, 19]])
    mask = torch.ones_like(ids)
    values = actor.value_forward(ids, mask, 1)       # (1, 5): prompt of 1 token, response of 5
    for t in range(values.shape[1]):                 # V before response token t reads position P - 1 + t = t
        reward = scorer.rm.score_tokens(ids[:, : t + 1], mask[:, : t + 1])
        # at the start V(prefix) is the RM's score of the prefix, normalised as the PPO rewards are
        assert torch.allclose(values[0, t], (reward[0] - stats["mean"]) / stats["std"], atol=1e-5)


def test_run_with_reward_model_folder(tiny_model_dir, tmp_path, reward_dir):
    cfg = ppo_config(tiny_model_dir, tmp_path / "run", max_steps=2, reward_model=str(reward_dir))
    metrics = run_ppo(cfg)
    assert metrics["reward_normalization"] == "rm_stats" and metrics["steps"] == 2


@pytest.mark.parametrize("pooling", ["last", "response"])
def test_rm_sees_the_layout_it_was_trained_on(tiny_model_dir, tmp_path, request, pooling):
    """A rollout's token layout scores like the RM's own encoding of the same texts, whether the response
    ended with EOS or was cut off at the token limit (no EOS: the RM still reads it as it was trained); with
    ``response`` pooling the means and the max read the rollout's response columns as the RM's encoding marks them."""
    from reward import RewardScorer

    from rlhf.generation import encode_prompts

    reward_dir = request.getfixturevalue("reward_dir" if pooling == "last" else "reward_dir_response")
    _, tokenizer, actor, scorer, _ = _built(tiny_model_dir, tmp_path, reward_dir)
    prompts = [[{"role": "user", "content": "Say something 1."}], [{"role": "user", "content": "Hi?"}],
               [{"role": "user", "content": "Hi?"}]]
    responses = ["sun river thanks", "sun", "river sun thanks sun"]
    enc = encode_prompts(tokenizer, prompts, "cpu")
    rows = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    rows[2] = rows[2][:-1]                                   # cut off: no EOS
    R = max(map(len, rows))
    resp = torch.tensor([r + [tokenizer.pad_token_id] * (R - len(r)) for r in rows])
    rmask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in rows])
    batch = ScoreInput(prompts, responses, torch.cat([enc["input_ids"], resp], 1),
                       torch.cat([enc["attention_mask"], rmask], 1), resp, rmask, enc["input_ids"].shape[1])
    standalone = RewardScorer.from_pretrained(reward_dir, device="cpu").score(prompts, responses)
    assert torch.allclose(scorer.score_batch(batch), torch.tensor(standalone), atol=1e-4)
    whole = batch.attention_mask
    bare = scorer.rm.score_tokens(batch.input_ids, whole, response_mask=whole)   # read at the last token, no EOS
    assert abs(float(bare[2]) - standalone[2]) > 1e-3
    if pooling != "last":  # the max over the prompt's columns too would score otherwise: the test can tell
        from rlhf.ppo.scorers import with_final_eos

        ids, mask = with_final_eos(batch.input_ids, whole, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert (scorer.rm.score_tokens(ids, mask, response_mask=mask) - torch.tensor(standalone)).abs().max() > 1e-3


def test_rm_runs_a_groups_prompt_once_with_the_same_scores(tiny_model_dir, tmp_path, reward_dir):
    """A rollout's K samples of a prompt (ScoreInput.group): the attached RM runs the prompt once, same scores."""
    from reward import RewardScorer

    from rlhf.generation import encode_prompts

    _, tokenizer, actor, scorer, _ = _built(tiny_model_dir, tmp_path, reward_dir)
    prompts = [[{"role": "user", "content": "Hi?"}]] * 2 + [[{"role": "user", "content": "Say something 1."}]] * 2
    responses = ["sun river thanks", "sun", "river sun thanks sun", "thanks"]
    enc = encode_prompts(tokenizer, prompts, "cpu")
    rows = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    rows[2] = rows[2][:-1]                                   # cut off: the scorer appends the EOS
    R = max(map(len, rows))
    resp = torch.tensor([r + [tokenizer.pad_token_id] * (R - len(r)) for r in rows])
    rmask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in rows])
    ids, mask = torch.cat([enc["input_ids"], resp], 1), torch.cat([enc["attention_mask"], rmask], 1)
    seen = []
    hook = actor.decoder.layers[0].register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0] * a[0].shape[1]))
    scores = {}
    for group in (1, 2):
        seen.clear()
        scores[group] = scorer.score_batch(ScoreInput(prompts, responses, ids, mask, resp, rmask,
                                                      enc["input_ids"].shape[1], group=group))
        scores[f"positions{group}"] = sum(seen)
    hook.remove()
    standalone = RewardScorer.from_pretrained(reward_dir, device="cpu").score(prompts, responses)
    assert torch.allclose(scores[2], scores[1], atol=1e-5)
    assert torch.allclose(scores[2], torch.tensor(standalone), atol=1e-4)
    assert scores["positions2"] < scores["positions1"]


def test_rm_reads_the_rollouts_response_positions(tiny_model_dir, tmp_path, reward_dir, monkeypatch):
    """The attached RM gets the response's positions (and the EOS it appends) as ``response_mask``: what
    pooling ``last_mean_embeddings_max`` takes its max over, as the RM's own encoding marks them."""
    from rlhf.generation import encode_prompts

    _, tokenizer, actor, scorer, _ = _built(tiny_model_dir, tmp_path, reward_dir)
    prompts = [[{"role": "user", "content": "Say something 1."}], [{"role": "user", "content": "Hi?"}]]
    responses = ["sun river thanks", "sun"]
    enc = encode_prompts(tokenizer, prompts, "cpu")
    rows = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    rows[1] = rows[1] + [tokenizer.eos_token_id]              # row 0 is cut off: the scorer appends its EOS
    R = max(map(len, rows))
    resp = torch.tensor([r + [tokenizer.pad_token_id] * (R - len(r)) for r in rows])
    rmask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in rows])
    P = enc["input_ids"].shape[1]
    seen = {}

    def spy(ids, mask, **kwargs):
        seen.update(kwargs, ids=ids, mask=mask)
        return torch.zeros(ids.shape[0])

    monkeypatch.setattr(scorer.rm, "score_tokens", spy)
    scorer.score_batch(ScoreInput(prompts, responses, torch.cat([enc["input_ids"], resp], 1),
                                  torch.cat([enc["attention_mask"], rmask], 1), resp, rmask, P))
    got = seen["response_mask"]
    want = torch.zeros_like(seen["mask"])
    lengths = [len(rows[0]) + 1, len(rows[1])]                # tokens + EOS
    for i, n in enumerate(lengths):
        want[i, P : P + n] = 1
    assert got.tolist() == want.tolist()
    assert seen["ids"][0, P + lengths[0] - 1] == tokenizer.eos_token_id


def test_with_final_eos_appends_only_where_missing():
    from rlhf.ppo.scorers import with_final_eos

    eos, pad = 9, 0
    ids = torch.tensor([[0, 5, 6, 9, 0], [0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    new_ids, new_mask = with_final_eos(ids, mask, eos, pad)
    assert new_ids.tolist() == [[0, 5, 6, 9, 0, 0], [0, 0, 5, 6, 7, 9], [5, 6, 7, 9, 0, 0]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    done_ids, done_mask = with_final_eos(new_ids, new_mask, eos, pad)
    assert done_ids is new_ids and done_mask is new_mask      # every row ends with EOS: unchanged


def test_rollout_logprobs_match_training_forward(tiny_model_dir, tmp_path):
    """Same temperature in sampling and recomputation: the first PPO ratio is exactly 1 (up to fp noise)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    actor = build_actor_critic(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter=None,
                               lora=lora_config(4, 8, 0.0, ["all-linear"]))
    actor.add_value_adapter(lora_config(4, 8, 0.0, ["all-linear"]))
    prompts = [[{"role": "user", "content": t}] for t in ("Hi", "What is the capital of France?", "Name a color.")]
    torch.manual_seed(0)
    r = collect_rollout(actor, tokenizer, TokenCountScorer([5]), prompts, temperature=0.6,
                        generate_kwargs={"do_sample": True, "max_new_tokens": 7, "temperature": 0.6, "top_k": 0},
                        max_prompt_length=64, chunk=2, timings={})
    assert r.response_ids.shape == r.response_mask.shape == r.logprobs.shape
    again = actor.policy_forward(r.input_ids[1:], r.attention_mask[1:], r.response_ids[1:], 0.6)["logprobs"]
    m = r.response_mask[1:].bool()
    assert (again - r.logprobs[1:])[m].abs().max() < 1e-5
    # without an SFT adapter and with LoRA B = 0 the reference equals the policy
    assert (r.ref_logprobs - r.logprobs)[r.response_mask.bool()].abs().max() < 1e-5
    # the recomputation uses the sampling temperature: logits / 0.6
    hot = actor.policy_forward(r.input_ids, r.attention_mask, r.response_ids, 1.0)["logprobs"]
    assert (hot - r.logprobs)[r.response_mask.bool()].abs().max() > 1e-3


def test_merged_policy_generates_like_the_adapter_and_restores_the_base(tiny_model_dir):
    """merge_for_generation: same greedy tokens and logits; the base tensors come back untouched."""
    from transformers import AutoModelForCausalLM

    from rlhf.packed_weights import merged_adapter

    actor = build_actor_critic(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter=None,
                               lora=lora_config(4, 8, 0.0, ["all-linear"]))
    with torch.no_grad():                                  # a policy LoRA that changes the outputs
        for name, p in actor.peft.named_parameters():
            if f".{POLICY}." in name:
                p.normal_(0, 0.5)
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in actor.peft.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 7, 11, 13, 17]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    kwargs = {"do_sample": False, "max_new_tokens": 6}
    with torch.no_grad(), actor.use(POLICY):                # the reference: HF generate on the adapter as it is
        plain = actor.peft.generate(input_ids=ids, attention_mask=mask, **kwargs, pad_token_id=0)[:, 5:]
    actor.restore_grad_flags()
    with torch.no_grad(), actor.use(POLICY):
        adapter_logits = actor.peft(input_ids=ids, attention_mask=mask).logits
        with merged_adapter(actor.peft, POLICY):
            merged_logits = actor.peft(input_ids=ids, attention_mask=mask).logits
        with actor.peft.disable_adapter():
            bare_logits = actor.peft(input_ids=ids, attention_mask=mask).logits
    actor.merge_for_generation = False
    assert torch.equal(plain, actor.generate(ids, mask, kwargs, 0, None))
    actor.merge_for_generation = True
    merged = actor.generate(ids, mask, kwargs, 0, None)
    assert torch.equal(plain, merged)
    keep = mask.bool()
    assert (adapter_logits[keep] - merged_logits[keep]).abs().max() < 1e-4
    assert (adapter_logits[keep] - bare_logits[keep]).abs().max() > 1e-2   # the adapter matters
    for n, p in actor.peft.named_parameters():
        if "lora_" not in n:
            assert p.data_ptr() == base[n][0] and torch.equal(p, base[n][1]), n
    trainable = [n for n, p in actor.peft.named_parameters() if p.requires_grad]
    assert trainable and all(f".{POLICY}." in n for n in trainable)


def test_merged_adapter_leaves_tied_weights_alone():
    """LoRA on an LM head tied to the embeddings: folding it would change the embeddings, so it is not folded."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.packed_weights import merged_adapter

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    peft = get_peft_model(model, lora_config(2, 4, 0.0, ["q_proj", "lm_head"]), adapter_name=POLICY)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if f".{POLICY}." in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[3, 7, 11, 13]])
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        embeddings = peft.get_input_embeddings().weight.detach().clone()
        with merged_adapter(peft, POLICY):
            assert torch.equal(peft.get_input_embeddings().weight, embeddings)   # nothing folded
            inside = peft(input_ids=ids).logits
    assert torch.allclose(inside, expected, atol=1e-6)


def test_sampling_weights_compute_like_the_model_and_are_undone():
    """Sampling's prepacked fp32 linears: same logits (float rounding), grad refused, all undone after."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.packed_weights import _packed_linear_ops, sampling_weights

    if _packed_linear_ops() is None:
        pytest.skip("this torch build has no oneDNN prepacked linear: sampling_weights only folds")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    hooked = model.model.layers[0].mlp.down_proj
    hooked.forward = lambda x: torch.zeros(*x.shape[:-1], 16)        # someone else's instance forward
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ptrs = [m.weight.data_ptr() for m in linears]
    ids = torch.tensor([[3, 7, 11, 13], [5, 1, 2, 9]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with sampling_weights(model):
        assert all("forward" in m.__dict__ for m in linears)
        assert hooked.forward(torch.ones(1, 32)).abs().sum() == 0                 # left alone
        with torch.no_grad():
            inside = model(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="no_grad"):
            model(input_ids=ids)
    assert (inside - expected).abs().max() < 1e-4 and inside.abs().max() > 1e-3
    assert [m.weight.data_ptr() for m in linears] == ptrs
    assert all("forward" not in m.__dict__ for m in linears if m is not hooked) and "forward" in hooked.__dict__


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "lm_head"]])
def test_sampling_weights_fold_the_policy_without_touching_the_base(targets):
    """Folding the policy LoRA into the packed copies: adapter logits, no dense copy of the base, tied LM head too."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.packed_weights import _packed_linear_ops, sampling_weights

    if _packed_linear_ops() is None:
        pytest.skip("this torch build has no oneDNN prepacked linear")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    peft = get_peft_model(model, lora_config(2, 4, 0.0, targets), adapter_name=POLICY)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if f".{POLICY}." in name:
                p.normal_(0, 0.5)
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in peft.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[3, 7, 11, 13], [5, 1, 2, 9]])
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        with peft.disable_adapter():
            bare = peft(input_ids=ids).logits
        with sampling_weights(peft, POLICY):
            inside = peft(input_ids=ids).logits
            for n, p in peft.named_parameters():
                if "lora_" not in n:
                    assert p.data_ptr() == base[n][0] and torch.equal(p, base[n][1]), n   # nothing merged in place
    assert (inside - expected).abs().max() < 1e-4
    assert (expected - bare).abs().max() > 1e-2                         # the adapter matters
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids).logits, expected)        # adapters back on afterwards


@pytest.mark.parametrize("extra", [
    {"use_dora": True},                                   # rescales W + delta_W by column norms
    {"lora_bias": True},                                  # a bias of its own
    {"target_modules": ["q_proj", "embed_tokens"]},       # LoRA on an embedding
    {"modules_to_save": ["lm_head"]},                     # a trained copy of a module
])
def test_sampling_weights_leave_adapters_that_are_not_a_plain_fold_on(extra):
    """Adapters that are not a plain W + delta_W on linears are sampled unfolded and still match the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.packed_weights import merged_adapter, sampling_weights

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    settings = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **extra}
    peft = get_peft_model(model, LoraConfig(**settings), adapter_name=POLICY)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
        ids = torch.tensor([[3, 7, 11, 13], [5, 1, 2, 9]])
        expected = peft(input_ids=ids).logits
        with peft.disable_adapter():
            bare = peft(input_ids=ids).logits
        with sampling_weights(peft, POLICY):
            inside = peft(input_ids=ids).logits
        with merged_adapter(peft, POLICY):                # the dense fold (GPU, other dtypes) leaves them on too
            dense = peft(input_ids=ids).logits
    assert (expected - bare).abs().max() > 1e-2
    assert (inside - expected).abs().max() < 1e-4
    assert (dense - expected).abs().max() < 1e-4


def test_sampling_weights_do_not_nest_and_are_undone_after_an_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.packed_weights import _packed_linear_ops, sampling_weights

    if _packed_linear_ops() is None:
        pytest.skip("this torch build has no oneDNN prepacked linear")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="in the body"):
        with sampling_weights(model):
            with pytest.raises(RuntimeError, match="does not nest"):
                with sampling_weights(model):
                    pass
            raise ValueError("in the body")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_packed_op_probe_leaves_the_global_rng_alone():
    import rlhf.packed_weights as packed_weights

    packed_weights._PACKED_OPS = None                    # probe again
    torch.manual_seed(123)
    packed_weights._packed_linear_ops()
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_policy_init_starts_the_policy_from_a_previous_adapter(tiny_model_dir, tmp_path):
    """Round 2 of iterative RLHF: the policy starts from round 1's aligned adapter, the reference stays SFT."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    run_ppo(ppo_config(tiny_model_dir, tmp_path / "round1", sft_adapter=str(sft), max_steps=2),
            scorer=TokenCountScorer(list(range(10, 42))))
    previous = load_file(str(tmp_path / "round1" / "adapter_model.safetensors"))
    sft_weights = load_file(str(sft / "adapter_model.safetensors"))
    assert max(float((previous[k] - sft_weights[k]).abs().max()) for k in previous) > 1e-4  # round 1 moved

    def build(policy_init):
        return build_actor_critic(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter=str(sft),
                                  lora=lora_config(4, 8, 0.0, ["all-linear"]), policy_init=policy_init)

    actor = build(str(tmp_path / "round1"))
    policy = get_peft_model_state_dict(actor.peft, adapter_name=POLICY)
    reference = get_peft_model_state_dict(actor.peft, adapter_name=REFERENCE)
    assert policy.keys() == previous.keys()
    for k in previous:
        assert torch.equal(policy[k], previous[k]), k
        assert torch.equal(reference[k], sft_weights[k]), k
    import json
    import shutil

    other = shutil.copytree(sft, tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(UserError, match="policy_init: .* has r 2, the policy adapter 4"):
        build(str(other))
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        build(str(tmp_path))
