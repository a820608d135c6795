"""Thin wiring of the PPO stage: load the base once, build adapters, attach the reward model.

This is the only module of ``rlhf.ppo`` that imports the ``reward`` package
(lazily, in :func:`load_reward_scorer`); the loop only sees a
:class:`~rlhf.ppo.scorers.Scorer`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rlhf.errors import ConfigError, UserError
from rlhf.hooked import decoder_layers
from rlhf.models import (
    check_adapter,
    check_lora_targets,
    hooked_adapter_type,
    load_base_model,
    load_tokenizer,
    lora_config,
    pick_device,
    pick_dtype,
    resolve_model_path,
)
from rlhf.ppo.adapters import build_actor_critic
from rlhf.ppo.checkpoint import list_checkpoints
from rlhf.ppo.config import PPOStageConfig
from rlhf.ppo.policy import ActorCritic
from rlhf.ppo.rollout import normalized_head, resolve_normalization
from rlhf.ppo.scorers import FunctionScorer, Scorer, TextScorer, TokenScorer

REWARD_ADAPTER = "reward"


def notice(message: str) -> None:
    print(message, file=sys.stderr)


def check_output_dir(cfg: PPOStageConfig) -> Path:
    """``output_dir`` checked before any set-up: not a file, no fresh run mixed into old checkpoints
    unless asked, a resume point that exists. Writes nothing."""
    from rlhf.outputs import check_not_input
    from rlhf.outputs import check_output_dir as check_folder
    from rlhf.ppo.checkpoint import resolve_resume

    out = check_folder(cfg.output_dir)
    check_not_input(out, {"dataset_name": cfg.dataset_name, "sft_adapter": cfg.sft_adapter,
                          "policy_init": cfg.policy_init,
                          "reward_model": cfg.reward_model, "model_name_or_path": cfg.model_name_or_path},
                    replaced=False)  # PPO writes into output_dir (checkpoints, resume), it does not replace it
    if cfg.resume_from_checkpoint:
        resolve_resume(cfg.resume_from_checkpoint, out / "checkpoints")
        check_same_run(cfg, out / "run_config.yaml")
    elif list_checkpoints(out / "checkpoints") and not cfg.overwrite_output_dir:
        raise UserError(
            f"output_dir {out} already holds checkpoints: resume with --resume_from_checkpoint latest, "
            "or pass --overwrite_output_dir true, or choose another output_dir"
        )
    return out


RUN_IDENTITY = ("model_name_or_path", "sft_adapter", "policy_init", "reward_model", "advantage_estimator",
                "samples_per_prompt", "value_model", "lora_r", "lora_alpha", "lora_target_modules", "lora_top_layers")


def check_same_run(cfg: PPOStageConfig, saved: Path) -> None:
    """A resumed run must be the run its checkpoints come from: the keys that decide the models (RUN_IDENTITY) as
    ``saved`` (its run_config.yaml) records them, or a UserError naming the first that differs."""
    import yaml

    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}

    def same(a, b) -> bool:
        if isinstance(a, str) and isinstance(b, str) and Path(a).expanduser().exists():
            return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        return a == b

    for key in RUN_IDENTITY:
        if key in before and not same(getattr(cfg, key), before[key]):
            raise UserError(f"resume_from_checkpoint: {key} is {getattr(cfg, key)!r} but the run being resumed used "
                            f"{before[key]!r} ({saved}); pass the same settings (e.g. --config {saved})")


def prepare_output_dir(cfg: PPOStageConfig) -> Path:
    """Create ``output_dir`` once set-up has succeeded (old checkpoints and logs go with ``overwrite_output_dir``)."""
    out = check_output_dir(cfg)
    if not cfg.resume_from_checkpoint and cfg.overwrite_output_dir:
        for sub in ("checkpoints", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    return out


def load_actor(cfg: PPOStageConfig):
    """(tokenizer, actor, resolved base path): one base model in memory, policy (+ reference) adapters on it."""
    hooked = hooked_adapter_type(cfg.sft_adapter)
    if cfg.sft_adapter:  # a missing or malformed config stops here, before the base loads
        try:
            check_adapter(cfg.sft_adapter, hooked=hooked is not None)
        except UserError as exc:
            raise UserError(f"sft_adapter: {exc}") from None
    if hooked is not None and hooked.method != "loreft":
        raise UserError(f"sft_adapter {cfg.sft_adapter} is a {hooked.method} adapter; PPO trains LoRA or LoReFT "
                        "policies (rlhf sft --method lora or --method loreft)")
    if hooked is not None and cfg.critic:
        raise UserError(f"sft_adapter {cfg.sft_adapter} is a LoReFT adapter: PPO trains a LoReFT policy with a "
                        f"critic-free advantage_estimator (rloo, grpo, reinforce_pp), not {cfg.advantage_estimator}")
    base_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(base_path, padding_side="left")
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {cfg.model_name_or_path} has no EOS token")
    device = pick_device()
    base = load_base_model(base_path, dtype=pick_dtype(cfg.precision, device), device=device)
    n_blocks = len(decoder_layers(base)[1])
    if cfg.lora_top_layers > n_blocks:
        raise ConfigError(f"config key 'lora_top_layers' is {cfg.lora_top_layers} but the model has {n_blocks} blocks "
                          "(0 = all of them)")
    if hooked is not None:
        from rlhf.ppo.hooked_policy import build_hooked_actor

        actor = build_hooked_actor(base, sft_adapter=cfg.sft_adapter, kind=hooked, base_name_or_path=base_path,
                                   policy_init=cfg.policy_init)
    else:
        if not cfg.sft_adapter:  # (with one, the policy copies the SFT adapter's config)
            check_lora_targets(base, cfg.lora_target_modules)
        lora = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                           top_layers=cfg.lora_top_layers, num_layers=n_blocks)
        actor = build_actor_critic(base, sft_adapter=cfg.sft_adapter, lora=lora,
                                   value_model=cfg.value_model if cfg.critic else "none",
                                   base_name_or_path=base_path, policy_init=cfg.policy_init)
    actor.freeze_policy_below(cfg.lora_top_layers)
    actor.merge_for_generation = cfg.merge_for_generation
    return tokenizer, actor, base_path


def check_reward_model(cfg: PPOStageConfig) -> None:
    """``reward_model`` is ``rule`` or a readable reward-model folder (checked before the policy loads)."""
    if not cfg.reward_model:
        raise ConfigError("config key 'reward_model' must be set (a folder written by `rlhf reward`, or `rule`)")
    if cfg.reward_model == "rule":
        return
    if not Path(cfg.reward_model).expanduser().exists():
        raise UserError(f"reward_model folder not found: {cfg.reward_model}")
    try:
        from reward.modeling import read_metadata
    except ImportError as exc:
        raise UserError(f"cannot import the reward package ({exc})") from None
    read_metadata(cfg.reward_model)


def load_reward_scorer(cfg: PPOStageConfig, actor: ActorCritic, tokenizer, base_path: str) -> Scorer:
    """The reward of ``cfg.reward_model``.

    A reward-model folder is attached to the shared base (its LoRA as a frozen ``reward`` adapter,
    token ids scored directly) when ``RewardScorer.incompatibility`` finds no reason against it;
    otherwise it is loaded standalone and scores re-tokenised texts. ``rule`` is the transparent
    rule of ``reward.rules`` (concise answers that end with a full stop), for demos and benchmarks.
    """
    check_reward_model(cfg)
    if cfg.reward_model == "rule":
        from reward.rules import rule_score

        return FunctionScorer(lambda prompts, responses: [rule_score(p, r) for p, r in zip(prompts, responses)])
    from reward import RewardScorer

    reason = RewardScorer.incompatibility(cfg.reward_model, base_path, tokenizer)
    if reason is None and not hasattr(actor.peft, "peft_config"):
        reason = "the policy is not a PEFT model (LoReFT interventions)"
    if reason is None:
        rm = RewardScorer.attach(actor.peft, tokenizer, cfg.reward_model, adapter_name=REWARD_ADAPTER)
        actor.restore_grad_flags()
        return TokenScorer(rm, cfg.reward_aggregate, cfg.reward_aggregate_std_coef)
    notice(f"reward model {cfg.reward_model} loaded separately: {reason}")
    return TextScorer(RewardScorer.from_pretrained(cfg.reward_model, precision=cfg.precision),
                      cfg.reward_aggregate, cfg.reward_aggregate_std_coef)


def load_gold_scorer(cfg: PPOStageConfig) -> Scorer | None:
    """The monitor's gold judge: ``rule:NAME`` (a rule of ``reward.rules``), a reward-model folder
    (loaded standalone, scoring texts), or None."""
    if not cfg.gold:
        return None
    if cfg.gold.startswith("rule:"):
        from rlhf.evaluate import load_rule

        rule = load_rule(cfg.gold[len("rule:"):])
        return FunctionScorer(lambda prompts, responses: [rule(p, r) for p, r in zip(prompts, responses)])
    if not Path(cfg.gold).expanduser().is_dir():
        raise UserError(f"gold: {cfg.gold} is neither rule:NAME nor a reward-model folder")
    from reward import RewardScorer

    return TextScorer(RewardScorer.from_pretrained(cfg.gold, precision=cfg.precision))


def init_value_model(cfg: PPOStageConfig, actor: ActorCritic, scorer: Scorer) -> None:
    """Add the value adapter and initialise the value head (from the reward model when asked and possible).
    A critic-free estimator has no value model: nothing to do."""
    if actor.value_model == "none":
        return
    rm = getattr(scorer, "rm", None)
    shares_rm = isinstance(scorer, TokenScorer) and REWARD_ADAPTER in getattr(actor.peft, "peft_config", {})
    rm_blocks = (getattr(rm, "metadata", None) or {}).get("trunk_layers")
    if cfg.value_head_init == "reward" and rm_blocks:
        notice(f"the reward model scores from block {rm_blocks} (trunk_layers), the value model from the top "
               "block: the value adapter and head start fresh")
        shares_rm = False
    if cfg.value_model == "separate":
        # the RM's LoRA is a fair start for the value trunk unless it sits on a merged SFT adapter
        plain_rm = shares_rm and f"{REWARD_ADAPTER}_sft" not in actor.peft.peft_config
        if cfg.value_head_init == "reward" and plain_rm:
            actor.add_value_adapter(init_from=REWARD_ADAPTER)
        else:
            actor.add_value_adapter(lora_config(
                cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                top_layers=cfg.value_lora_top_layers, num_layers=len(decoder_layers(actor.decoder)[1]),
                top_layers_key="value_lora_top_layers",
            ))
    if cfg.value_head_init != "reward" or rm_blocks:
        return
    head = getattr(rm, "head_weight", None)
    if head is None:
        notice("value_head_init: reward, but the scorer has no reward head: the value head starts at zero")
        return
    weight, bias = head()
    if weight.numel() != actor.value_head.weight.numel():
        pooling = (getattr(rm, "metadata", None) or {}).get("pooling")
        notice(f"the reward head reads {weight.numel()} features (pooling {pooling}), the value head the "
               f"{actor.value_head.weight.numel()} of one token's state: the value head starts at zero")
        return
    if resolve_normalization(cfg.reward_normalization, scorer.stats) == "rm_stats":
        weight, bias = normalized_head(weight, bias, scorer.stats)  # predict the rewards PPO trains on
    actor.init_value_head(weight, bias)
