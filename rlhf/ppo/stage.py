"""The ``rlhf ppo`` stage: load prompts, policy, reward and monitor (:mod:`rlhf.ppo.wiring`), run the loop
(:class:`~rlhf.ppo.trainer.PPOTrainer`), then export the selected policy with ``metrics.json``."""

from __future__ import annotations

import shutil

from rlhf import distributed
from rlhf.errors import UserError
from rlhf.ppo import checkpoint as ckpt
from rlhf.ppo.config import PPOStageConfig
from rlhf.ppo.monitor import Monitor
from rlhf.ppo.sharding import check_parallel
from rlhf.ppo.trainer import PPOTrainer


def run_ppo(cfg: PPOStageConfig, scorer=None) -> dict:
    """``rlhf ppo``: train the policy adapter; write ``output_dir`` (adapter, checkpoints/, logs/, metrics.json).

    ``scorer`` (tests, custom rewards): a :class:`~rlhf.ppo.scorers.Scorer`, or a callable
    ``(actor, tokenizer) -> Scorer`` for scorers that attach to the shared model. None loads
    ``cfg.reward_model``.
    """
    from transformers import set_seed

    from rlhf.config import save_config
    from rlhf.data import fingerprint, load_prompts
    from rlhf.models import count_parameters
    from rlhf.outputs import with_umask_mode, write_json
    from rlhf.ppo import wiring
    from rlhf.ppo.scorers import Scorer
    from rlhf.tracking import MetricsLogger

    world, is_main = distributed.world_size(), distributed.is_main()
    check_parallel(cfg, world)
    set_seed(cfg.seed)
    prompts = load_prompts(cfg.dataset_name, cfg.max_prompts)
    held_out = load_prompts(cfg.eval_dataset_name, cfg.eval_max_prompts) if cfg.eval_steps else None
    gold = wiring.load_gold_scorer(cfg) if cfg.eval_steps else None
    out = wiring.check_output_dir(cfg)  # created only once set-up has succeeded
    if scorer is None:
        wiring.check_reward_model(cfg)  # before the policy loads
    tokenizer, actor, base_path = wiring.load_actor(cfg)
    if scorer is None:
        scorer = wiring.load_reward_scorer(cfg, actor, tokenizer, base_path)
    elif not isinstance(scorer, Scorer) and callable(scorer):
        scorer = scorer(actor, tokenizer)
    wiring.init_value_model(cfg, actor, scorer)
    monitor = None
    if held_out is not None:
        monitor = Monitor(held_out, scorer, gold, max_new_tokens=cfg.max_new_tokens,
                          max_prompt_length=cfg.max_prompt_length, chunk=cfg.per_device_eval_batch_size)
    set_seed(cfg.seed + distributed.rank())  # the same RNG stream whatever the set-up consumed; one per process
    distributed.barrier()  # every process has checked output_dir before rank 0 prepares it
    if is_main:
        out = wiring.prepare_output_dir(cfg)
    distributed.barrier()
    trainer = PPOTrainer(cfg, actor, tokenizer, scorer, prompts, out, None, base_name_or_path=base_path,
                         monitor=monitor)
    trainer.restore()  # a resume checkpoint that does not fit stops here: run_config.yaml and logs/ stay as they were
    logger = None
    if is_main:
        save_config(cfg, out / "run_config.yaml")
        trainer.logger = logger = MetricsLogger(out / "logs", tensorboard=cfg.report_to == "tensorboard",
                                                purge_step=trainer.step + 1 if trainer.step else None)
    trainable = sum(p.numel() for p in actor.trainable_parameters())
    head = [] if actor.value_head is None else list(actor.value_head.parameters())
    total = count_parameters(actor.peft)[1] + sum(p.numel() for p in head)
    if is_main:
        on = f" on {world} processes" if world > 1 else ""
        wiring.notice(f"PPO{on}: {len(prompts)} prompts, {trainable:,} of {total:,} parameters trainable")
    try:
        summary = trainer.train()
    finally:
        if logger is not None:
            logger.close()
    if not is_main:
        distributed.barrier()  # rank 0 exports
        return {}
    selected = trainer.selected_point()
    if selected is not None:  # the best monitored policy, kept in best_policy/ (STEP names it) when it was scored
        kept = trainer.best_policy_dir
        if not (kept / "STEP").is_file() or (kept / "STEP").read_text() != str(selected.step):
            kept = trainer.ckpt_dir / ckpt.step_dir_name(selected.step) / "policy"  # e.g. resumed past a later best
        if not (kept / "adapter_config.json").is_file():
            raise UserError(f"select_checkpoint: the policy of step {selected.step} was not kept (no checkpoint of it)")
        for f in kept.iterdir():
            if f.name != "STEP":
                shutil.copy2(f, out / f.name)
        summary["selected_step"] = selected.step
        wiring.notice(f"exported the policy of step {selected.step} ({cfg.select_checkpoint})")
    else:
        actor.save_policy(out, base_path)
    tokenizer.save_pretrained(str(out))
    metrics = {**summary, "trainable_parameters": trainable, "total_parameters": total,
               "dataset_fingerprint": fingerprint(cfg.dataset_name)}
    write_json(out / "metrics.json", metrics)
    with_umask_mode(out)  # the adapter and checkpoints as readable as any file the user creates
    wiring.notice(f"PPO done in {summary['wall_time_s']:.0f}s: reward {summary['reward_first_steps']:.3f} -> "
                  f"{summary['reward_last_steps']:.3f}; adapter in {out}")
    distributed.barrier()
    return metrics
