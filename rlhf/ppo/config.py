"""Options of ``rlhf ppo``: :class:`PPOStageConfig`.

Batch arithmetic (checked in ``__post_init__``)::

    rollout_batch_size = num_mini_batches * mini_batch_size
    mini_batch_size    = gradient_accumulation_steps * per_device_train_batch_size

One PPO step = one rollout of ``rollout_batch_size`` responses (``samples_per_prompt`` for each of
``rollout_batch_size / samples_per_prompt`` prompts), then
``ppo_epochs`` passes over it in ``num_mini_batches`` optimizer steps each.
``max_steps`` counts PPO steps (rollouts), so ``warmup_steps`` and the
learning-rate schedule do too.
"""

from __future__ import annotations

import dataclasses
import math

from rlhf.config import Literal, Optional, TrainingConfig, check_lora_keys, field, require
from rlhf.errors import ConfigError


@dataclasses.dataclass
class PPOStageConfig(TrainingConfig):
    """Options of ``rlhf ppo`` (PPO with LoRA adapters against a reward model)."""

    # inputs / outputs
    dataset_name: str = field("sample:prompts", "prompts (`prompt` column: string or message list)")
    output_dir: str = field("outputs/ppo", "folder for the aligned adapter, checkpoints/, logs/, metrics.json")
    sft_adapter: Optional[str] = field(
        None, "SFT adapter folder (LoRA, or LoReFT from `rlhf sft --method loreft`: then the policy trains "
        "interventions): becomes the frozen reference and the starting point of the policy"
    )
    policy_init: Optional[str] = field(
        None, "start the policy from this adapter (e.g. the previous round's aligned policy) instead of a "
        "copy of sft_adapter, which stays the reference; same kind and shape as sft_adapter"
    )
    reward_model: Optional[str] = field(
        None, "reward-model folder written by `rlhf reward`, or `rule` (reward.rules: concise answers ending in '.')"
    )
    max_prompts: Optional[int] = field(None, "use at most this many prompts")
    max_prompt_length: int = field(256, "prompts longer than this many tokens are truncated from the left")
    overwrite_output_dir: bool = field(False, "start afresh even if output_dir already holds checkpoints")

    # batch layout
    rollout_batch_size: int = field(8, "rollouts (responses) per PPO step: rollout_batch_size / samples_per_prompt prompts")
    samples_per_prompt: int = field(1, "responses sampled per prompt in a step (>= 2 for rloo and grpo)")
    num_mini_batches: int = field(1, "optimizer steps per PPO epoch; rollout_batch_size must divide by it")
    ppo_epochs: int = field(2, "passes over each rollout batch")
    per_device_train_batch_size: Optional[int] = field(
        None, "micro-batch for forward/backward; null = mini-batch / gradient_accumulation_steps"
    )
    per_device_eval_batch_size: int = field(8, "batch of the no-grad passes (generation, log-probs, values, rewards)")
    share_prompt_pass: bool = field(
        True, "with samples_per_prompt K > 1, run each prompt once for its K responses in the log-prob, reference, "
        "policy training and attached reward passes (same results up to rounding; mini-batches hold whole groups)"
    )

    # optimisation (learning_rate etc. come from TrainingConfig)
    learning_rate: float = field(5e-5, "peak learning rate of the policy and value adapters")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        "linear", "learning-rate schedule over PPO steps"
    )
    cliprange: float = field(0.2, "PPO ratio clip epsilon")
    cliprange_value: float = field(0.2, "value clip epsilon (around the rollout-time values)")
    vf_coef: float = field(0.1, "weight of the value loss")
    entropy_coef: float = field(0.0, "weight of an entropy bonus (0 = off)")
    advantage_estimator: Literal["gae", "rloo", "grpo", "reinforce_pp"] = field(
        "gae", "gae: learned value adapter + GAE; rloo: leave-one-out baseline of the prompt's other samples; "
        "grpo: scores normalised within each prompt's samples; reinforce_pp: KL-shaped return whitened over "
        "the batch. The three critic-free ones train no value model and run no value passes"
    )
    grpo_scale_std: bool = field(True, "grpo: divide by the group's std (false = Dr. GRPO, centring only)")
    kl_in: Literal["reward", "loss"] = field(
        "reward", "reward: per-token KL penalty in the reward; loss: kl_coef * KL (k2/k3) added to the policy loss"
    )
    gamma: float = field(1.0, "discount factor")
    lam: float = field(0.95, "GAE lambda")
    whiten_advantages: bool = field(True, "gae and rloo: normalise advantages over the batch (masked)")

    # KL penalty
    kl_coef: float = field(0.05, "per-token KL penalty coefficient (initial value if adaptive)")
    kl_estimator: Literal["k1", "k2", "k3"] = field("k1", "KL estimator in the per-token penalty (k1 and k3 are logged)")
    kl_controller: Literal["fixed", "adaptive"] = field("fixed", "fixed kl_coef or adaptive towards target_kl")
    target_kl: float = field(6.0, "adaptive controller: target sequence KL (nats)")
    kl_horizon: float = field(10000.0, "adaptive controller: horizon in rollouts")

    # reward
    reward_normalization: Literal["auto", "rm_stats", "batch", "none"] = field(
        "auto", "rm_stats: (score - mean) / std with the RM's saved stats; batch: whiten per rollout; auto: rm_stats if available"
    )
    reward_clip: Optional[float] = field(10.0, "clip normalised scores to [-reward_clip, reward_clip] (null = off)")
    missing_eos_penalty: Optional[float] = field(-1.0, "added to the score of responses without EOS (null = off)")
    empty_response_penalty: Optional[float] = field(
        -1.0, "added to the score of empty responses (nothing but whitespace), which a reward model trained on "
        "labelled answers has never seen (null = off)"
    )
    reward_aggregate: Literal["mean", "min", "mean_minus_std"] = field(
        "mean", "ensemble RM (rlhf reward --ensemble K): members' scores combined as their mean, their min (worst "
        "case), or mean - reward_aggregate_std_coef * std (uncertainty-weighted); one RM: its score"
    )
    reward_aggregate_std_coef: float = field(1.0, "mean_minus_std: weight of the members' standard deviation")

    # sampling
    temperature: float = field(0.7, "sampling temperature; log-probs are recomputed with the same temperature")
    top_p: float = field(1.0, "nucleus sampling threshold (1 keeps the sampling distribution exact)")
    max_new_tokens: int = field(48, "maximum new tokens per response")
    merge_for_generation: bool = field(
        True, "sample with the policy LoRA folded into a temporary copy of the weights it adapts "
        "(no per-layer LoRA calls per sampled token; that copy exists while sampling)"
    )

    # adapters and value model
    lora_r: int = field(16, "LoRA rank of the policy and value adapters (ignored for the policy with sft_adapter)")
    lora_alpha: int = field(32, "LoRA alpha")
    lora_dropout: float = field(0.0, "LoRA dropout (0 keeps log-prob ratios exact)")
    lora_target_modules: list[str] = field(["all-linear"], "modules LoRA wraps (names or all-linear)")
    lora_top_layers: int = field(
        0, "train the policy on the top N blocks only (0 = all): below them policy and reference stay the same "
        "function, so those blocks run once per rollout for both and backward stops above them"
    )
    value_model: Literal["separate", "shared"] = field(
        "separate", "separate: own 'value' LoRA adapter + head; shared: head on the policy's last hidden state"
    )
    value_head_init: Literal["reward", "zero"] = field(
        "reward", "reward: copy the reward model's score head (and LoRA when it shares the base); zero: zeros"
    )
    value_lora_top_layers: int = field(
        0, "a fresh value LoRA on the top N blocks only: the blocks below run once per rollout (0 = all blocks)"
    )

    # logging, checkpoints, guards
    logging_steps: int = field(1, "write metrics every N PPO steps (and at the first and last step)")
    sample_every: int = field(5, "print and log a few sample responses every N steps (0 = never)")
    num_samples: int = field(2, "responses shown each time samples are logged")
    save_steps: int = field(10, "write a checkpoint every N PPO steps (0 = only at the end)")
    save_total_limit: Optional[int] = field(3, "keep at most this many checkpoints (null = all)")
    resume_from_checkpoint: Optional[str] = field(None, "checkpoint folder, or `latest` in output_dir/checkpoints")
    eval_steps: int = field(0, "every N PPO steps answer eval_dataset_name greedily and score it (0 = off)")
    eval_dataset_name: Optional[str] = field(None, "held-out prompts for the over-optimisation monitor")
    eval_max_prompts: Optional[int] = field(64, "use at most this many held-out prompts (null = all)")
    gold: Optional[str] = field(
        None, "gold judge of the held-out answers: rule:NAME (a rule of reward/rules.py) or a reward-model folder"
    )
    select_checkpoint: Literal["last", "best_gold", "best_proxy_heldout"] = field(
        "last", "which policy is exported: the last, or the monitor point with the best gold / held-out proxy score"
    )
    max_ratio: float = field(100.0, "stop when a probability ratio exceeds this (exploding update; 0 = off)")
    progress: bool = field(True, "show a progress bar")

    def __post_init__(self):
        require(self.gradient_accumulation_steps >= 1, "config key 'gradient_accumulation_steps' must be >= 1")
        require(self.rollout_batch_size >= 1, "config key 'rollout_batch_size' must be >= 1")
        require(self.num_mini_batches >= 1, "config key 'num_mini_batches' must be >= 1")
        if self.rollout_batch_size % self.num_mini_batches:
            raise ConfigError(
                f"config key 'rollout_batch_size' ({self.rollout_batch_size}) must be divisible by "
                f"'num_mini_batches' ({self.num_mini_batches})"
            )
        require(self.samples_per_prompt >= 1, "config key 'samples_per_prompt' must be >= 1")
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ConfigError(
                f"config key 'rollout_batch_size' ({self.rollout_batch_size}) must be divisible by "
                f"'samples_per_prompt' ({self.samples_per_prompt})"
            )
        if self.advantage_estimator in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ConfigError(
                f"advantage_estimator: {self.advantage_estimator} needs config key 'samples_per_prompt' >= 2 "
                f"(got {self.samples_per_prompt})"
            )
        if self.kl_in == "loss" and self.kl_estimator == "k1":
            raise ConfigError("kl_in: loss needs config key 'kl_estimator' k2 or k3 (k1's gradient is not the KL's)")
        mini = self.mini_batch_size
        if self.per_device_train_batch_size is None:
            if mini % self.gradient_accumulation_steps:
                raise ConfigError(
                    f"config key 'gradient_accumulation_steps' ({self.gradient_accumulation_steps}) must divide "
                    f"the mini-batch (rollout_batch_size / num_mini_batches = {mini})"
                )
            self.per_device_train_batch_size = mini // self.gradient_accumulation_steps
        elif self.per_device_train_batch_size * self.gradient_accumulation_steps != mini:
            raise ConfigError(
                f"config key 'per_device_train_batch_size' ({self.per_device_train_batch_size}) x "
                f"'gradient_accumulation_steps' ({self.gradient_accumulation_steps}) must equal the mini-batch "
                f"rollout_batch_size / num_mini_batches = {mini}; or set per_device_train_batch_size: null"
            )
        super().__post_init__()
        require(self.ppo_epochs >= 1, "config key 'ppo_epochs' must be >= 1")
        require(self.cliprange > 0, "config key 'cliprange' must be > 0")
        require(self.value_lora_top_layers >= 0, "config key 'value_lora_top_layers' must be >= 0")
        require(self.lora_top_layers >= 0, "config key 'lora_top_layers' must be >= 0")
        require(self.cliprange_value > 0, "config key 'cliprange_value' must be > 0")
        require(self.vf_coef >= 0, "config key 'vf_coef' must be >= 0")
        require(self.entropy_coef >= 0, "config key 'entropy_coef' must be >= 0")
        require(0 < self.gamma <= 1, "config key 'gamma' must be in (0, 1]")
        require(0 <= self.lam <= 1, "config key 'lam' must be in [0, 1]")
        require(self.kl_coef >= 0, "config key 'kl_coef' must be >= 0")
        if self.kl_controller == "adaptive":
            require(self.target_kl > 0, "config key 'target_kl' must be > 0 with kl_controller: adaptive")
            require(self.kl_horizon > 0, "config key 'kl_horizon' must be > 0")
            require(self.kl_coef > 0, "config key 'kl_coef' must be > 0 with kl_controller: adaptive")
        require(self.reward_clip is None or self.reward_clip > 0, "config key 'reward_clip' must be > 0 or null")
        require(self.reward_aggregate_std_coef >= 0, "config key 'reward_aggregate_std_coef' must be >= 0")
        require(
            self.missing_eos_penalty is None or math.isfinite(self.missing_eos_penalty),
            "config key 'missing_eos_penalty' must be a finite number or null",
        )
        require(
            self.empty_response_penalty is None or math.isfinite(self.empty_response_penalty),
            "config key 'empty_response_penalty' must be a finite number or null",
        )
        require(self.temperature > 0, "config key 'temperature' must be > 0")
        require(0 < self.top_p <= 1, "config key 'top_p' must be in (0, 1]")
        require(self.max_new_tokens >= 1, "config key 'max_new_tokens' must be >= 1")
        require(self.max_prompt_length >= 1, "config key 'max_prompt_length' must be >= 1")
        require(self.max_prompts is None or self.max_prompts >= 1, "config key 'max_prompts' must be >= 1")
        check_lora_keys(self)
        require(self.sample_every >= 0, "config key 'sample_every' must be >= 0")
        require(self.num_samples >= 1, "config key 'num_samples' must be >= 1")
        require(self.save_steps >= 0, "config key 'save_steps' must be >= 0")
        require(
            self.save_total_limit is None or self.save_total_limit >= 1, "config key 'save_total_limit' must be >= 1"
        )
        require(self.eval_steps >= 0, "config key 'eval_steps' must be >= 0")
        require(self.eval_max_prompts is None or self.eval_max_prompts >= 1, "config key 'eval_max_prompts' must be >= 1")
        if self.eval_steps and not self.eval_dataset_name:
            raise ConfigError("config key 'eval_steps' > 0 needs 'eval_dataset_name' (held-out prompts)")
        if self.select_checkpoint != "last" and not self.eval_steps:
            raise ConfigError(f"select_checkpoint: {self.select_checkpoint} needs config key 'eval_steps' > 0")
        if self.select_checkpoint == "best_gold" and not self.gold:
            raise ConfigError("select_checkpoint: best_gold needs config key 'gold' (rule:NAME or a reward-model folder)")
        require(self.max_ratio == 0 or self.max_ratio > 1, "config key 'max_ratio' must be > 1 (or 0 = off)")

    @property
    def critic(self) -> bool:
        """Does the estimator learn a value model (GAE)? The others use sampled baselines."""
        return self.advantage_estimator == "gae"

    @property
    def prompts_per_step(self) -> int:
        return self.rollout_batch_size // self.samples_per_prompt

    @property
    def mini_batch_size(self) -> int:
        return self.rollout_batch_size // self.num_mini_batches

    def total_steps(self, n_prompts: int) -> int:
        """PPO steps of the run: ``max_steps``, else enough rollouts for ``num_train_epochs`` passes."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * n_prompts / self.prompts_per_step))
