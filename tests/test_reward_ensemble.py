"""Reward-model ensembles (``ensemble: K``), their aggregation for PPO, and the ODIN-style length head."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from reward import RewardScorer
from reward.evaluate import evaluate_pairs, score_pairs
from reward.losses import length_disentangle_loss, orthogonality_loss, pearson_t
from reward.modeling import ENSEMBLE_FILE, LENGTH_HEAD_FILE, METADATA_FILE, read_metadata
from reward.member import bootstrap_pairs
from reward.train import RewardStageConfig, run_reward
from rlhf.errors import ConfigError
from rlhf.pairs import load_pairs, load_splits
from rlhf.ppo.aggregate import aggregate_rewards, aggregate_stats, aggregate_table, ensemble_moments
from rlhf.ppo.scorers import ScoreInput, TextScorer, TokenScorer
from rlhf.testing import write_jsonl
from test_reward_model import easy_rows, policy_model, some_texts

K = 3




def rm_config(tiny_model_dir, tmp, **overrides) -> RewardStageConfig:
    values = dict(
        model_name_or_path=tiny_model_dir,
        dataset_name=str(write_jsonl(Path(tmp) / "prefs.jsonl", easy_rows(48))),
        output_dir=str(Path(tmp) / "rm"),
        max_steps=8,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        eval_fraction=0.25,
        lora_r=4,
        lora_alpha=8,
        logging_steps=4,
        report_to="none",
        stats_max_pairs=12,
    )
    values.update(overrides)
    return RewardStageConfig(**values)


@pytest.fixture(scope="module")
def ensemble(tiny_model_dir, tmp_path_factory):
    """Three members with LoRA on the top block only (the block below is run once for all members)."""
    tmp = tmp_path_factory.mktemp("ensemble")
    cfg = rm_config(tiny_model_dir, tmp, ensemble=K, lora_top_layers=1)
    return cfg, run_reward(cfg)


def member_as_single_rm(ensemble_dir: Path, index: int, dest: Path) -> Path:
    """Member ``index`` of an ensemble folder as a plain one-member reward-model folder."""
    dest.mkdir(parents=True)
    for f in Path(ensemble_dir, "members", str(index)).iterdir():
        shutil.copy2(f, dest / f.name)
    for name in (METADATA_FILE, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (ensemble_dir / name).is_file():
            shutil.copy2(ensemble_dir / name, dest / name)
    return dest


def left_padded(scorer, prompts, responses):
    seqs, _ = scorer.encode(prompts, responses)
    width, pad = max(map(len, seqs)), scorer.tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


# aggregation math (worked by hand)

# K = 2 members, B = 3 responses
SCORES = torch.tensor([[1.0, 2.0, 6.0],
                       [3.0, 2.0, 0.0]])
# per response: mean (2, 2, 3); min (1, 2, 0); population std (1, 0, 3)


def test_aggregate_rewards_by_hand():
    assert aggregate_rewards(SCORES, "mean").tolist() == [2.0, 2.0, 3.0]
    assert aggregate_rewards(SCORES, "min").tolist() == [1.0, 2.0, 0.0]
    assert aggregate_rewards(SCORES, "mean_minus_std", 1.0).tolist() == [1.0, 2.0, 0.0]
    assert aggregate_rewards(SCORES, "mean_minus_std", 0.5).tolist() == [1.5, 2.0, 1.5]
    assert aggregate_rewards(SCORES, "mean_minus_std", 0.0).tolist() == [2.0, 2.0, 3.0]
    one = torch.tensor([[0.5, -1.0, 2.0]])  # a single member: every aggregate is its score
    for how in ("mean", "min", "mean_minus_std"):
        assert aggregate_rewards(one, how, 2.0).tolist() == [0.5, -1.0, 2.0]
    assert SCORES.tolist() == [[1.0, 2.0, 6.0], [3.0, 2.0, 0.0]]  # input not mutated
    with pytest.raises(ValueError, match="unknown reward aggregate"):
        aggregate_rewards(SCORES, "max")
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        aggregate_rewards(torch.tensor([1.0, 2.0]), "mean")


def test_aggregate_stats_by_hand():
    # m = (2, 2, 3): E 7/3, Var 2/9;  d = (1, 0, 3): E 4/3, Var 14/9;  Cov(m, d) = 5/9
    mom = ensemble_moments(SCORES)
    assert mom["mean_of_mean"] == pytest.approx(7 / 3) and mom["var_of_mean"] == pytest.approx(2 / 9)
    assert mom["mean_of_std"] == pytest.approx(4 / 3) and mom["var_of_std"] == pytest.approx(14 / 9)
    assert mom["cov_mean_std"] == pytest.approx(5 / 9)
    stats = {"mean": 7 / 3, "std": math.sqrt(2 / 9), "n": 3, "source": "test", **aggregate_table(SCORES)}
    # min = (1, 2, 0): mean 1, variance 2/3
    assert stats["aggregates"]["min"]["mean"] == pytest.approx(1.0)
    assert stats["aggregates"]["min"]["std"] == pytest.approx(math.sqrt(2 / 3))
    assert aggregate_stats(stats, "mean")["mean"] == pytest.approx(7 / 3)
    assert aggregate_stats(stats, "min")["std"] == pytest.approx(math.sqrt(2 / 3))
    # c = 1: m - d = (1, 2, 0): mean 1, Var 2/9 + 14/9 - 2 * 5/9 = 2/3
    s1 = aggregate_stats(stats, "mean_minus_std", 1.0)
    assert s1["mean"] == pytest.approx(1.0) and s1["std"] == pytest.approx(math.sqrt(2 / 3)) and s1["n"] == 3
    # c = 1/2: (1.5, 2, 1.5): mean 5/3, Var 2/9 + 14/36 - 5/9 = 1/18
    s2 = aggregate_stats(stats, "mean_minus_std", 0.5)
    assert s2["mean"] == pytest.approx(5 / 3) and s2["std"] == pytest.approx(math.sqrt(1 / 18))
    single = {"mean": 0.3, "std": 2.0, "n": 10}
    assert aggregate_stats(single, "min") == single and aggregate_stats(None, "min") is None


def test_length_losses_by_hand():
    up, down = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    assert pearson_t(up, up).item() == pytest.approx(1.0)
    assert pearson_t(up, down).item() == pytest.approx(-1.0)
    # quality (1, 0, 1) vs lengths (1, 2, 3): centred (1/3, -2/3, 1/3) . (-1, 0, 1) = 0 -> rho 0
    assert pearson_t(torch.tensor([1.0, 0.0, 1.0]), up).item() == pytest.approx(0.0, abs=1e-7)
    # |rho(r_Q, L)| - rho(r_L, L): quality anti-correlated (|-1| = 1), length head perfectly correlated (1)
    assert length_disentangle_loss(down, up, up).item() == pytest.approx(0.0, abs=1e-6)
    assert length_disentangle_loss(torch.tensor([1.0, 0.0, 1.0]), up, up).item() == pytest.approx(-1.0)
    assert length_disentangle_loss(up, down, up).item() == pytest.approx(2.0)
    # |(1, 2, 0) . (-4, 1, 5)| = |-4 + 2 + 0| = 2
    assert orthogonality_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[-4.0, 1.0, 5.0]])).item() == 2.0
    # constant lengths: no correlation and a finite gradient
    q = torch.tensor([0.5, 1.5, -1.0], requires_grad=True)
    loss = length_disentangle_loss(q, q * 2, torch.tensor([4.0, 4.0, 4.0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()


def test_bootstrap_resample_is_seeded_and_with_replacement():
    pairs = list(range(20))
    a, b, c = bootstrap_pairs(pairs, 1), bootstrap_pairs(pairs, 1), bootstrap_pairs(pairs, 2)
    assert a == b and a != c and len(a) == 20 and set(a) <= set(pairs)
    assert len(set(a)) < 20  # 20 draws with replacement from 20 repeat some (seeded: fixed outcome)


def test_config_validation(tiny_model_dir, tmp_path):
    from rlhf.ppo.config import PPOStageConfig

    with pytest.raises(ConfigError, match="ensemble"):
        rm_config(tiny_model_dir, tmp_path, ensemble=0)
    with pytest.raises(ConfigError, match="length_head_coef"):
        rm_config(tiny_model_dir, tmp_path, length_head_coef=-1.0)
    with pytest.raises(ConfigError, match="reward_aggregate_std_coef"):
        PPOStageConfig(reward_aggregate_std_coef=-0.5)
    assert PPOStageConfig().reward_aggregate == "mean"


# training an ensemble


def test_ensemble_folder_layout(ensemble):
    cfg, metrics = ensemble
    out = Path(cfg.output_dir)
    desc = json.loads((out / ENSEMBLE_FILE).read_text())
    assert desc["size"] == K and [m["path"] for m in desc["members"]] == ["members/0", "members/1", "members/2"]
    assert [m["seed"] for m in desc["members"]] == [cfg.seed, cfg.seed + 1, cfg.seed + 2]
    for i in range(K):
        assert (out / "members" / str(i) / "adapter_model.safetensors").is_file()
    # the top level is member 0, so a reader that knows no ensembles still loads a working RM
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (out / "members" / "0" / name).read_bytes()
    assert read_metadata(out)["ensemble"] == K
    assert all(m["calibration"]["std"] > 0 for m in desc["members"])
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["ensemble"] == K and set(stats["aggregates"]) == {"mean", "min", "mean_minus_std"}
    assert stats["mean"] == pytest.approx(stats["aggregates"]["mean"]["mean"])
    # every member is standardised on these very responses, so their mean score averages to 0 there
    assert stats["mean"] == pytest.approx(0.0, abs=1e-5)
    assert stats["aggregates"]["min"]["mean"] < stats["aggregates"]["mean"]["mean"]
    assert len(metrics["members"]) == K and len(metrics["eval_member_accuracy"]) == K
    assert metrics["ensemble"] == K and metrics["eval_member_disagreement"] > 0
    assert metrics["steps"] == K * cfg.max_steps


def test_members_differ_after_training(ensemble):
    from safetensors.torch import load_file

    cfg, metrics = ensemble
    out = Path(cfg.output_dir)
    weights = [load_file(str(out / "members" / str(i) / "adapter_model.safetensors")) for i in range(K)]
    assert set(weights[0]) == set(weights[1]) == set(weights[2])
    for i in range(K):
        for j in range(i + 1, K):
            assert any(not torch.equal(weights[i][k], weights[j][k]) for k in weights[i]), (i, j)
    # each member saw its own bootstrap resample
    distinct = [m["distinct_train_pairs"] for m in metrics["members"]]
    assert all(d < metrics["train_pairs"] for d in distinct)
    scorer = RewardScorer.from_pretrained(out)
    per = torch.tensor(scorer.score_members(*some_texts()))  # (K, 6)
    assert per.shape == (K, 6)
    assert all(not torch.allclose(per[i], per[j]) for i in range(K) for j in range(i + 1, K))


def test_scorer_mean_is_the_mean_of_member_scores(ensemble, tiny_model_dir, tmp_path):
    cfg, _ = ensemble
    prompts, responses = some_texts()
    standalone = RewardScorer.from_pretrained(cfg.output_dir)
    assert standalone.ensemble_size == K
    per = torch.tensor(standalone.score_members(prompts, responses))
    assert standalone.score(prompts, responses) == pytest.approx(per.mean(0).tolist(), abs=1e-6)

    # the token path: mean and members from the same left-padded batch
    ids, mask = left_padded(standalone, prompts, responses)
    members = standalone.score_tokens(ids, mask, members=True)
    assert members.shape == (K, 6) and torch.allclose(members, per, atol=1e-5)
    assert standalone.score_tokens(ids, mask).tolist() == pytest.approx(members.mean(0).tolist(), abs=1e-6)

    # attached to a policy: same numbers, one adapter per member on the shared base
    policy = policy_model(tiny_model_dir)
    attached = RewardScorer.attach(policy, standalone.tokenizer, cfg.output_dir)
    assert attached.metadata["attached_adapters"] == ["reward", "reward_member1", "reward_member2"]
    assert policy.active_adapters == ["policy"]
    assert torch.allclose(torch.tensor(attached.score_members(prompts, responses)), per, atol=1e-5)
    assert attached.score(prompts, responses) == pytest.approx(per.mean(0).tolist(), abs=1e-5)
    att_members = attached.score_tokens(ids, mask, members=True)
    assert attached.score_tokens(ids, mask).tolist() == pytest.approx(att_members.mean(0).tolist(), abs=1e-6)
    assert policy.active_adapters == ["policy"]
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".reward" in n)


def test_each_member_scores_like_it_does_alone(ensemble, tmp_path):
    """Member i of the ensemble (lower block shared across members) == member i's folder loaded as one RM,
    standardised with its calibration."""
    cfg, _ = ensemble
    prompts, responses = some_texts()
    ens = RewardScorer.from_pretrained(cfg.output_dir)
    assert ens.untouched_blocks() == 1  # LoRA on the top block only: block 0 runs once per batch
    per = ens.score_members(prompts, responses)
    members = json.loads((Path(cfg.output_dir) / ENSEMBLE_FILE).read_text())["members"]
    for i in range(K):
        alone = RewardScorer.from_pretrained(member_as_single_rm(Path(cfg.output_dir), i, tmp_path / f"m{i}"))
        assert alone.ensemble_size == 1
        cal = members[i]["calibration"]
        expected = [(r - cal["mean"]) / cal["std"] for r in alone.score(prompts, responses)]
        assert per[i] == pytest.approx(expected, abs=1e-5)


def test_calibration_is_folded_into_the_head():
    from reward.attach import frozen_head

    like = torch.zeros(1)
    head = frozen_head({"weight": torch.tensor([[2.0, 4.0]])}, like, {"mean": 1.0, "std": 2.0})
    # raw 2 * 1 + 4 * 1 = 6 -> (6 - 1) / 2 = 2.5;  raw 2 * 0.5 + 4 * (-1) = -3 -> (-3 - 1) / 2 = -2
    assert head(torch.tensor([[1.0, 1.0], [0.5, -1.0]])).squeeze(-1).tolist() == [2.5, -2.0]
    with_bias = frozen_head({"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.tensor([3.0])}, like,
                            {"mean": 1.0, "std": 4.0})
    assert with_bias(torch.tensor([[5.0, 7.0]])).item() == 1.75  # (5 + 3 - 1) / 4
    plain = frozen_head({"weight": torch.tensor([[1.0, 2.0]])}, like)
    assert plain.bias is None and plain(torch.tensor([[1.0, 1.0]])).item() == 3.0


def test_min_and_mean_minus_std_never_exceed_mean(ensemble):
    cfg, _ = ensemble
    _, held = load_splits(cfg)
    scorer = RewardScorer.from_pretrained(cfg.output_dir)
    prompts = [p.prompt_messages for p in held] * 2
    responses = [p.chosen for p in held] + [p.rejected for p in held]
    per = torch.tensor(scorer.score_members(prompts, responses))
    mean = aggregate_rewards(per, "mean")
    assert (aggregate_rewards(per, "min") <= mean).all()
    assert (aggregate_rewards(per, "mean_minus_std", 1.0) <= mean).all()
    assert (aggregate_rewards(per, "min") < mean).any()  # the members disagree somewhere


def test_reload_reproduces_metrics(ensemble):
    cfg, metrics = ensemble
    _, held = load_splits(cfg)
    scorer = RewardScorer.from_pretrained(cfg.output_dir)
    again = evaluate_pairs(scorer, held)
    assert again["accuracy"] == metrics["eval_accuracy"]
    assert again["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-5)
    assert again["length_correlation"] == pytest.approx(metrics["eval_length_correlation"], abs=1e-4)
    prompts = [p.prompt_messages for p in held] * 2
    responses = [p.chosen for p in held] + [p.rejected for p in held]
    per = scorer.score_members(prompts, responses)
    n = len(held)
    member_acc = [sum(c > r for c, r in zip(row[:n], row[n:])) / n for row in per]
    assert member_acc == pytest.approx(metrics["eval_member_accuracy"])
    std = torch.tensor(per).std(dim=0, unbiased=False).mean().item()
    assert std == pytest.approx(metrics["eval_member_disagreement"], abs=1e-5)
    assert scorer.stats["mean"] == pytest.approx(metrics["train_reward_mean"])


# PPO's view of an ensemble


def _score_input(scorer, prompts, responses):
    ids, mask = left_padded(scorer, prompts, responses)
    return ScoreInput(prompts, responses, ids, mask, ids[:, -2:], mask[:, -2:], ids.shape[1] - 2)


def test_ppo_scorers_aggregate_member_scores(ensemble, tiny_model_dir):
    cfg, _ = ensemble
    prompts, responses = some_texts()
    standalone = RewardScorer.from_pretrained(cfg.output_dir)
    per = torch.tensor(standalone.score_members(prompts, responses))
    saved = json.loads((Path(cfg.output_dir) / "reward_stats.json").read_text())

    text = TextScorer(standalone, "mean_minus_std", 0.5)
    batch = _score_input(standalone, prompts, responses)
    expected = per.mean(0) - 0.5 * per.std(0, unbiased=False)
    assert torch.allclose(text.score_batch(batch), expected, atol=1e-5)
    mom = saved["moments"]
    assert text.stats["mean"] == pytest.approx(mom["mean_of_mean"] - 0.5 * mom["mean_of_std"])

    policy = policy_model(tiny_model_dir)
    token = TokenScorer(RewardScorer.attach(policy, standalone.tokenizer, cfg.output_dir), "min")
    assert torch.allclose(token.score_batch(batch), per.min(0).values, atol=1e-5)
    assert token.stats["mean"] == saved["aggregates"]["min"]["mean"]
    assert token.stats["std"] == saved["aggregates"]["min"]["std"]
    mean_scorer = TokenScorer(token.rm)
    assert torch.allclose(mean_scorer.score_batch(batch), per.mean(0), atol=1e-5)
    assert mean_scorer.stats["mean"] == saved["mean"]


def test_ppo_wiring_and_one_step_with_an_ensemble(ensemble, tiny_model_dir, tmp_path):
    from rlhf.ppo import wiring
    from rlhf.ppo.config import PPOStageConfig
    from rlhf.ppo.stage import run_ppo

    rm_cfg, _ = ensemble
    cfg = PPOStageConfig(
        model_name_or_path=tiny_model_dir, dataset_name="sample:prompts", output_dir=str(tmp_path / "ppo"),
        reward_model=rm_cfg.output_dir, reward_aggregate="min", max_steps=1, rollout_batch_size=4, ppo_epochs=1,
        max_new_tokens=4, lora_r=4, lora_alpha=8, report_to="none", progress=False, sample_every=0, save_steps=0,
    )
    tokenizer, actor, base_path = wiring.load_actor(cfg)
    scorer = wiring.load_reward_scorer(cfg, actor, tokenizer, base_path)
    assert isinstance(scorer, TokenScorer) and scorer.aggregate == "min" and scorer.members == K
    assert {"reward", "reward_member1", "reward_member2"} <= set(actor.peft.peft_config)
    assert scorer.stats["mean"] == json.loads((Path(rm_cfg.output_dir) / "reward_stats.json").read_text())[
        "aggregates"]["min"]["mean"]
    metrics = run_ppo(cfg)
    assert metrics["steps"] == 1 and math.isfinite(metrics["reward_last_steps"])


# length debiasing

WORDS = ["sun", "tree", "river", "cloud", "stone", "bird", "road", "city", "rain", "light"]


def length_biased_rows(n: int, seed: int = 0) -> list[dict]:
    """The chosen response ends in 'thanks'; in 85% of pairs it is also the one padded with extra words.

    Length alone orders 85% of the pairs, so a plain RM soon scores length.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        pad = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        long_chosen = rng.random() < 0.85
        chosen = body + (pad if long_chosen else "") + " thanks"
        rejected = body + ("" if long_chosen else pad)
        rows.append({"prompt": f"Say something about the {rng.choice(WORDS)} {i}.", "chosen": chosen,
                     "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def length_runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("length")
    data = str(write_jsonl(tmp / "biased.jsonl", length_biased_rows(80)))
    runs = {}
    for mode in ("none", "length_head"):
        cfg = rm_config(tiny_model_dir, tmp, dataset_name=data, output_dir=str(tmp / mode), max_steps=20,
                        length_debias=mode)
        runs[mode] = (cfg, run_reward(cfg))
    return runs


def test_length_head_decorrelates_the_quality_head(length_runs):
    plain, odin = length_runs["none"][1], length_runs["length_head"][1]
    assert plain["eval_length_correlation"] > 0.5  # the plain RM learned length
    assert abs(odin["eval_length_correlation"]) < abs(plain["eval_length_correlation"]) - 0.3
    assert odin["eval_length_head_correlation"] > 0.5  # the length went into the length head
    assert odin["length_debias"] == "length_head" and "length_debias" not in plain


def test_length_head_is_saved_apart_and_scoring_reproduces_the_metrics(length_runs):
    from safetensors.torch import load_file

    cfg, metrics = length_runs["length_head"]
    out = Path(cfg.output_dir)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "length_head" not in adapter["modules_to_save"]  # the saved score head is the quality head
    assert not any("length" in key for key in load_file(str(out / "adapter_model.safetensors")))
    length_head = load_file(str(out / LENGTH_HEAD_FILE))
    assert length_head["weight"].shape == (1, 32)
    assert read_metadata(out)["length_debias"] == "length_head"
    assert not (Path(length_runs["none"][0].output_dir) / LENGTH_HEAD_FILE).exists()
    _, held = load_splits(cfg)
    scorer = RewardScorer.from_pretrained(out)
    again = evaluate_pairs(scorer, held)
    assert again["accuracy"] == metrics["eval_accuracy"]
    assert again["length_correlation"] == pytest.approx(metrics["eval_length_correlation"], abs=1e-4)
    # the length head was trained (not its seeded initial value) and carries length
    from reward.modeling import build_reward_model
    from reward.member import new_length_head

    initial = new_length_head(build_reward_model(cfg.model_name_or_path, None, torch.float32, torch.device("cpu"),
                                                 seed=cfg.seed), cfg.seed)
    assert not torch.allclose(initial.weight, length_head["weight"])
    head = torch.nn.Linear(32, 1, bias=False)
    head.weight.data.copy_(length_head["weight"])
    scored = score_pairs(RewardScorer(scorer.trunk, head, scorer.tokenizer, max_length=cfg.max_length,
                                      owner=scorer._owner), held)
    from reward.losses import pearson

    corr = pearson(scored["chosen"] + scored["rejected"], [float(x) for x in scored["chosen_len"] + scored["rejected_len"]])
    assert corr == pytest.approx(metrics["eval_length_head_correlation"], abs=1e-4)


def test_length_debias_with_an_ensemble_trains(tiny_model_dir, tmp_path):
    cfg = rm_config(tiny_model_dir, tmp_path, ensemble=2, length_debias="length_head", max_steps=3,
                    ensemble_bootstrap=False)
    metrics = run_reward(cfg)
    out = Path(cfg.output_dir)
    assert all((out / "members" / str(i) / LENGTH_HEAD_FILE).is_file() for i in range(2))
    assert [m["distinct_train_pairs"] for m in metrics["members"]] == [metrics["train_pairs"]] * 2
    assert len(load_pairs(cfg.dataset_name)) == 48
    scorer = RewardScorer.from_pretrained(out)
    assert scorer.ensemble_size == 2


def test_reward_evaluate_reports_members(ensemble, tmp_path):
    from reward.evaluate import RewardEvalConfig, run_reward_evaluate

    cfg, metrics = ensemble
    held = tmp_path / "held.jsonl"
    _, pairs = load_splits(cfg)
    write_jsonl(held, [{"prompt": p.prompt_messages[-1]["content"], "chosen": p.chosen, "rejected": p.rejected}
                       for p in pairs])
    out = run_reward_evaluate(RewardEvalConfig(reward_model=cfg.output_dir, dataset_name=str(held)))
    assert out["accuracy"] == metrics["eval_accuracy"] and out["n"] == len(pairs)
    assert out["member_accuracy"] == pytest.approx(metrics["eval_member_accuracy"])
    assert out["member_disagreement"] == pytest.approx(metrics["eval_member_disagreement"], abs=1e-5)
