"""The DPO stage: ``rlhf dpo --config configs/dpo.yaml``, TRL's ``DPOTrainer`` on ``rlhf reward``'s preference files.

Policy and reference live on one base model as two LoRA adapters of one ``PeftModel``:

* ``default``  the trained policy. With ``sft_adapter`` it starts as the SFT LoRA itself (same config,
               same weights), so the exported adapter alone applies to the original base model, as PPO's
               does; without one it is a fresh LoRA (``lora_*`` keys).
* ``ref``      the reference: with ``sft_adapter`` a frozen copy of the SFT LoRA that TRL makes before
               training; without one TRL disables the adapter and the reference is ``model_name_or_path``
               itself (then that should already be the SFT policy, e.g. a merged SFT model).

Loss (``loss_type: sigmoid``, Rafailov et al. 2023), per pair with y_w chosen and y_l rejected:
``-log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])``;
log-probs are sums over the response tokens. The other ``loss_type`` values are TRL's variants.

Output folder (written through ``staged_output``, so nothing appears if the run fails)::

    output_dir/
      adapter_config.json, adapter_model.safetensors   the policy LoRA (PEFT, base = the original base)
      tokenizer files                                  the tokenizer it was trained with
      run_config.yaml, metrics.json, logs/             resolved config, results, metrics.jsonl + TensorBoard

Launched on N processes (``accelerate launch``), every process trains on its share of each batch (TRL's
trainer synchronises the gradients) and rank 0 alone writes the folder.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rlhf.config import Literal, Optional, TrainingConfig, check_lora_keys, field, require
from rlhf.errors import DataError, UserError
from rlhf.outputs import check_not_input, shared_staged_output

# the loss types TRL 1.16's DPOTrainer implements (trl/trainer/dpo_trainer.py, _compute_loss)
LOSS_TYPES = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
POLICY, REFERENCE = "default", "ref"  # adapter names DPOTrainer uses for a PeftModel with a pretrained adapter
# TRL's metric names (prefixed eval_ on held-out pairs) copied into metrics.json
TRL_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
               "logps/rejected")


@dataclasses.dataclass
class DPOStageConfig(TrainingConfig):
    """Options of ``rlhf dpo``."""

    dataset_name: str = field(
        "outputs/prefs.jsonl", "preference pairs: prompt/chosen/rejected, HH-style dialogues or message lists"
    )
    output_dir: str = field("outputs/dpo", "folder for the policy adapter, metrics.json, run_config.yaml, logs/")
    learning_rate: float = field(5e-5, "peak learning rate")
    sft_adapter: Optional[str] = field(
        None, "LoRA SFT adapter: the policy starts from it and the reference is it, frozen (recommended)"
    )
    beta: float = field(0.1, "strength of the pull towards the reference (higher = stays closer)")
    loss_type: LOSS_TYPES = field("sigmoid", "DPO loss (TRL DPOTrainer's loss_type; sigmoid = the DPO paper's)")
    label_smoothing: float = field(0.0, "robust: probability a label is flipped, in [0, 0.5); exo_pair: epsilon > 0")
    max_length: int = field(
        512, "keep at most the first N tokens of prompt + response (pairs whose prompt fills it are dropped)"
    )
    eval_dataset_name: Optional[str] = field(None, "separate held-out preference file (overrides eval_fraction)")
    eval_fraction: float = field(0.1, "fraction of distinct prompts held out (all their pairs) for reward accuracy")
    eval_steps: int = field(0, "also evaluate every N optimizer steps during training (0 = only at the end)")
    precompute_ref_log_probs: bool = field(
        False, "score every pair under the reference once before training (no reference pass per step)"
    )
    lora_r: int = field(16, "LoRA rank (only without sft_adapter: otherwise the SFT adapter's config is kept)")
    lora_alpha: int = field(32, "LoRA scaling alpha (only without sft_adapter)")
    lora_dropout: float = field(0.0, "LoRA dropout (only without sft_adapter; TRL disables dropout while training)")
    lora_target_modules: list[str] = field(["all-linear"], "modules LoRA wraps (only without sft_adapter)")
    max_train_samples: Optional[int] = field(None, "use at most this many training pairs")

    def __post_init__(self):
        super().__post_init__()
        require(self.beta > 0, "config key 'beta' must be > 0")
        require(0 <= self.label_smoothing < 1, "config key 'label_smoothing' must be in [0, 1)")
        if self.loss_type == "robust":
            require(self.label_smoothing < 0.5, "config key 'label_smoothing' must be < 0.5 for loss_type robust")
        if self.loss_type == "exo_pair":
            require(self.label_smoothing > 0,
                    "config key 'label_smoothing' must be > 0 for loss_type exo_pair (e.g. 1e-3)")
        require(self.max_length >= 16, "config key 'max_length' must be >= 16")
        require(0 <= self.eval_fraction < 1, "config key 'eval_fraction' must be in [0, 1)")
        require(self.eval_steps >= 0, "config key 'eval_steps' must be >= 0")
        check_lora_keys(self)
        require(
            self.max_train_samples is None or self.max_train_samples >= 1, "config key 'max_train_samples' must be >= 1"
        )
        require(
            not self.eval_steps or self.eval_fraction > 0 or bool(self.eval_dataset_name),
            "config key 'eval_steps' needs held-out pairs (eval_fraction > 0 or eval_dataset_name)",
        )


# helper functions


def pairs_to_dataset(pairs, shared_folder: Path | None = None):
    """TRL's conversational explicit-prompt layout: ``prompt`` messages, one-turn ``chosen`` / ``rejected``.

    ``shared_folder`` (on N processes): rank 0 saves the dataset there and every process reads it back, so that
    the files TRL derives from it are one set that all processes see. TRL's precomputed reference log-probs are
    such a file: rank 0 writes it next to the dataset's own files and every rank reads it, and an in-memory
    dataset's files would be in each process's own temporary folder."""
    import datasets

    from rlhf import distributed

    data = datasets.Dataset.from_list([
        {
            "prompt": p.prompt_messages,
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in pairs
    ])
    if shared_folder is None or distributed.world_size() == 1:
        return data
    if distributed.is_main():
        data.save_to_disk(str(shared_folder))
    distributed.barrier()
    return datasets.load_from_disk(str(shared_folder))


def check_sft_adapter(sft_adapter: str) -> None:
    """The SFT folder must hold a PEFT LoRA adapter (DPO copies it into the policy and the reference)."""
    from rlhf.models import check_causal_lm_adapter, hooked_adapter_type, not_peft_message, read_adapter_config

    path = Path(sft_adapter)
    if not path.is_dir():
        raise UserError(f"config key 'sft_adapter': folder not found: {sft_adapter}")
    hooked = hooked_adapter_type(path)
    if hooked is not None:
        raise UserError(f"config key 'sft_adapter': {not_peft_message(sft_adapter, hooked.method)}")
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"sft_adapter folder {sft_adapter} has no adapter_config.json "
            "(for a full or merged SFT model pass it as model_name_or_path)"
        )
    config = read_adapter_config(path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"sft_adapter {sft_adapter} is a {config.get('peft_type')} adapter; DPO needs a LoRA adapter")
    check_causal_lm_adapter(f"sft_adapter {sft_adapter}", config)


def build_policy(cfg: DPOStageConfig):
    """(model, peft_config for the trainer): base + trainable SFT LoRA, or the bare base + a fresh LoRA config."""
    from rlhf.models import check_lora_targets, load_base_model, lora_config, pick_device, pick_dtype

    device = pick_device()
    base = load_base_model(cfg.model_name_or_path, dtype=pick_dtype(cfg.precision, device), device=device)
    if not cfg.sft_adapter:
        check_lora_targets(base, cfg.lora_target_modules)
        return base, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    from peft.tuners.tuners_utils import BaseTunerLayer

    from rlhf.models import load_peft_adapter

    check_sft_adapter(cfg.sft_adapter)
    model = load_peft_adapter(base, cfg.sft_adapter, adapter_name=POLICY, is_trainable=True)
    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise UserError(f"sft_adapter {cfg.sft_adapter} adapts the LM head; TRL's DPOTrainer cannot train that")
    return model, None


def build_trainer(cfg: DPOStageConfig, work: Path, train_pairs, held_pairs, logger=None):
    """A ``DPOTrainer`` whose policy is adapter ``default`` and whose reference is the SFT policy."""
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from rlhf.budget import stage_callbacks
    from rlhf.hf_trainer import trainer_kwargs, whole_eval_set
    from rlhf.models import load_tokenizer, pick_device, tokenizer_source

    tokenizer = load_tokenizer(tokenizer_source(cfg.model_name_or_path, cfg.sft_adapter))
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of {cfg.model_name_or_path} has no EOS token")
    periodic = bool(cfg.eval_steps and held_pairs)
    set_seed(cfg.seed)  # a fresh LoRA's initialisation is part of the run
    model, peft_config = build_policy(cfg)
    args = DPOConfig(
        **trainer_kwargs(cfg, str(work / "trainer"), periodic, cfg.eval_steps or None),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        dataset_num_proc=None,
        dataloader_pin_memory=pick_device().type == "cuda",
    )
    shared = work / "trainer" / "pairs" if cfg.precompute_ref_log_probs else None  # removed with the trainer's files
    trainer = whole_eval_set(DPOTrainer)(
        model=model,
        args=args,
        train_dataset=pairs_to_dataset(train_pairs, shared and shared / "train"),
        eval_dataset=pairs_to_dataset(held_pairs, shared and shared / "eval") if held_pairs else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=stage_callbacks(cfg, logger),
    )
    if cfg.sft_adapter and REFERENCE not in trainer.model.peft_config:
        raise UserError(
            "TRL's DPOTrainer made no frozen copy of the SFT adapter; refusing to train against the bare base"
        )
    if len(trainer.train_dataset) == 0:
        raise DataError(f"every training prompt is longer than max_length {cfg.max_length}; raise max_length")
    return trainer


def held_out_metrics(trainer) -> dict:
    """TRL's loss, reward accuracy and margins on the held-out pairs (``eval_`` prefix), as floats."""
    raw = trainer.evaluate()
    keys = ["eval_loss"] + [f"eval_{k}" for k in TRL_METRICS]
    return {k: float(raw[k]) for k in keys if k in raw}


def train_metrics(trainer) -> dict:
    """Means of TRL's training logs over the last logging window (reward accuracy, margins)."""
    logged = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    last = logged[-1] if logged else {}
    return {f"train_{k}": float(last[k]) for k in TRL_METRICS[:2] if k in last}


def run_dpo(cfg: DPOStageConfig) -> dict:
    """Train the policy adapter with DPO and write ``cfg.output_dir``; returns the metrics of ``metrics.json``."""
    from rlhf import distributed
    from rlhf.budget import stopped_by_budget
    from rlhf.data import fingerprint
    from rlhf.hf_trainer import Stopwatch, finish_output, parallel_notice
    from rlhf.models import count_parameters, resolve_model_path, save_adapter
    from rlhf.pairs import load_splits
    from rlhf.tracking import MetricsLogger

    watch = Stopwatch()
    if cfg.sft_adapter:
        check_sft_adapter(cfg.sft_adapter)  # before anything is loaded or written
    check_not_input(cfg.output_dir, {"dataset_name": cfg.dataset_name, "eval_dataset_name": cfg.eval_dataset_name,
                                     "sft_adapter": cfg.sft_adapter, "model_name_or_path": cfg.model_name_or_path})
    train_pairs, held_pairs = load_splits(cfg)
    main, world = distributed.is_main(), distributed.world_size()
    with shared_staged_output(cfg.output_dir) as work:
        logger = MetricsLogger(work / "logs", tensorboard=cfg.report_to == "tensorboard") if main else None
        try:
            trainer = build_trainer(cfg, work, train_pairs, held_pairs, logger)
            if not cfg.sft_adapter and main:
                print(f"DPO without sft_adapter: the reference is {cfg.model_name_or_path} itself (adapters disabled)",
                      file=sys.stderr)  # fmt: skip
            trainable, total = count_parameters(trainer.model)
            dropped = len(train_pairs) - len(trainer.train_dataset)
            if main:
                print(
                    f"DPO ({cfg.loss_type}, beta {cfg.beta}): {len(trainer.train_dataset)} train pairs, "
                    f"{len(held_pairs)} held-out pairs, {trainable:,} of {total:,} parameters trainable, reference = "
                    + (f"SFT adapter {cfg.sft_adapter}" if cfg.sft_adapter else f"{cfg.model_name_or_path}")
                    + (f", {dropped} pairs dropped (prompt longer than max_length)" if dropped else "")
                    + (f", {world} processes" if world > 1 else ""),
                    file=sys.stderr,
                )
                notice = parallel_notice(trainer)
                if notice:
                    print(notice, file=sys.stderr)
            result = trainer.train()
            runtime = result.metrics.get("train_runtime", 0.0)
            metrics = {
                "loss_type": cfg.loss_type,
                "beta": cfg.beta,
                "world_size": world,
                "train_loss": result.metrics.get("train_loss"),
                **train_metrics(trainer),
                "train_pairs": len(trainer.train_dataset),
                "eval_pairs": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
                "dropped_pairs": dropped,
                "steps": trainer.state.global_step,
                "stopped_by_time_budget": stopped_by_budget(trainer),
                "sft_adapter": cfg.sft_adapter,
                "reference": "sft_adapter" if cfg.sft_adapter else "base",
                "trainable_parameters": trainable,
                "total_parameters": total,
                "train_runtime_s": round(runtime, 2),
                "dataset_fingerprint": fingerprint(cfg.dataset_name),
            }
            if held_pairs:
                held = held_out_metrics(trainer)
                metrics.update(held)
                if logger is not None:
                    logger.log(trainer.state.global_step, {f"final/{k}": v for k, v in held.items()})
        finally:
            if logger is not None:
                logger.close()
        if main:
            save_adapter(trainer.model, POLICY, work, resolve_model_path(cfg.model_name_or_path))
            finish_output(trainer, work, cfg, metrics, watch.seconds)
    if not main:
        return metrics
    acc = metrics.get("eval_rewards/accuracies")
    tail = ""
    if acc is not None:
        tail = f", held-out reward accuracy {acc:.3f}, margin {metrics['eval_rewards/margins']:.3f}"
    print(f"DPO done in {metrics['wall_time_s']:.0f}s: {cfg.output_dir}{tail}", file=sys.stderr)
    return metrics


__all__ = ["DPOStageConfig", "run_dpo"]
