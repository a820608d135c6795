"""The PPO loop (:class:`PPOTrainer`); the ``rlhf ppo`` stage around it is :func:`rlhf.ppo.stage.run_ppo`.

One step: collect a rollout (rollout.py), shape rewards and compute GAE
targets, then ``ppo_epochs`` x ``num_mini_batches`` clipped policy/value
updates with gradient accumulation, log, and checkpoint every ``save_steps``.
Guards stop the run on non-finite rewards, losses or gradients and on
exploding probability ratios, naming the last good checkpoint.

On N processes (``accelerate launch``, ``torchrun``) the run is data-parallel: ``rollout_batch_size``
is the global batch; each process samples, scores and trains on its own share of the step's prompts
(a prompt's K samples stay on one process); whitening, batch normalisation of scores and the KL
controller's input use the global batch; the trainable gradients are summed over processes (the
losses are normalised by the mini-batch's global token count); rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf import distributed
from rlhf.budget import TimeBudget
from rlhf.data import prompt_text
from rlhf.errors import UserError
from rlhf.models import enable_activation_checkpointing
from rlhf.ppo import checkpoint as ckpt
from rlhf.ppo.config import PPOStageConfig
from rlhf.ppo.losses import (
    explained_variance,
    kl_penalty_loss,
    make_kl_controller,
    policy_loss,
    token_mean,
    value_loss,
)
from rlhf.ppo.monitor import SELECT_KEYS, best_point
from rlhf.ppo.policy import disable_dropout
from rlhf.ppo.rollout import (
    PromptStream,
    Rollout,
    collect_rollout,
    compute_targets,
    empty_responses,
    process_scores,
    resolve_normalization,
    rollout_stats,
)
from rlhf.ppo.sharding import check_parallel, mini_batch_rows

__all__ = ["PPOGuardError", "PPOStageConfig", "PPOTrainer"]


class PPOGuardError(UserError):
    """A guard stopped the run (non-finite values or an exploding ratio)."""


class PPOTrainer:
    """Runs PPO steps on an :class:`~rlhf.ppo.policy.ActorCritic` against a scorer, writing into ``out_dir``."""

    def __init__(self, cfg: PPOStageConfig, actor, tokenizer, scorer, prompts: list, out_dir, logger=None,
                 base_name_or_path: str | None = None, monitor=None):
        from transformers import get_scheduler

        self.cfg, self.actor, self.tokenizer, self.scorer, self.prompts = cfg, actor, tokenizer, scorer, prompts
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.logger = logger
        self.base_name_or_path = base_name_or_path
        self.total_steps = cfg.total_steps(len(prompts))
        self.params = actor.trainable_parameters()
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        check_parallel(cfg, self.world)
        distributed.broadcast_parameters(self.params)  # every process starts from rank 0's weights
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.kl_ctl = make_kl_controller(cfg.kl_controller, cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.stream = PromptStream(len(prompts), cfg.prompts_per_step, cfg.seed)
        self.normalization = self._resolve_normalization()
        self.generate_kwargs = {"do_sample": True, "max_new_tokens": cfg.max_new_tokens,
                                "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None
        self.monitor = monitor  # rlhf.ppo.monitor.Monitor, or None
        disable_dropout(actor.peft)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(actor.base)

    def _resolve_normalization(self) -> str:
        return resolve_normalization(self.cfg.reward_normalization, getattr(self.scorer, "stats", None))

    # guards

    def _stop(self, cause: str):
        where = (f"last good checkpoint: {self.last_checkpoint} (resume with --resume_from_checkpoint "
                 f"{self.last_checkpoint})") if self.last_checkpoint else "no checkpoint was written yet"
        raise PPOGuardError(f"PPO stopped at step {self.step + 1}: {cause}; {where}")

    # one step

    def ppo_step(self) -> dict:
        cfg = self.cfg
        k = cfg.samples_per_prompt  # rows i*k .. i*k+k-1: the k samples of one prompt
        step_prompts = self.stream.next_indices()  # the same on every process; each takes its share
        share = len(step_prompts) // self.world
        mine = step_prompts[self.rank * share : (self.rank + 1) * share]
        prompts = [self.prompts[i] for i in mine for _ in range(k)]
        reduce_sum = distributed.all_reduce_sum if self.world > 1 else None
        timings: dict = {}
        start = time.perf_counter()
        self.actor.peft.eval()
        rollout = collect_rollout(self.actor, self.tokenizer, self.scorer, prompts, temperature=cfg.temperature,
                                  generate_kwargs=self.generate_kwargs, max_prompt_length=cfg.max_prompt_length,
                                  chunk=cfg.per_device_eval_batch_size, timings=timings,
                                  group=k if cfg.share_prompt_pass else 1)
        bad = (~torch.isfinite(rollout.raw_scores)).sum().item()
        if bad:
            self._stop(f"the reward scorer returned NaN/inf for {bad} of {rollout.size} responses")
        scores = process_scores(rollout.raw_scores, rollout.has_eos, normalization=self.normalization,
                                stats=getattr(self.scorer, "stats", None), clip=cfg.reward_clip,
                                missing_eos_penalty=cfg.missing_eos_penalty, reduce_sum=reduce_sum,
                                empty=empty_responses(rollout.responses),
                                empty_response_penalty=cfg.empty_response_penalty)
        if not torch.isfinite(scores).all():
            self._stop("normalised rewards are NaN/inf (check the reward model's saved stats)")
        kl_coef = self.kl_ctl.value
        compute_targets(rollout, scores, kl_coef=kl_coef, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma,
                        lam=cfg.lam, whiten_advantages=cfg.whiten_advantages, estimator=cfg.advantage_estimator,
                        group_size=k, kl_in=cfg.kl_in, grpo_scale_std=cfg.grpo_scale_std, reduce_sum=reduce_sum)
        stats = rollout_stats(rollout, reduce_sum)
        if rollout.values is not None:
            stats["value/explained_variance"] = float(explained_variance(rollout.values, rollout.returns,
                                                                         rollout.response_mask, reduce_sum))
        stats = distributed.all_reduce_stats(stats)  # global already, or equal shares: the mean of the means
        if not math.isfinite(stats["kl/k1"]):
            self._stop("the KL to the reference is NaN/inf")
        t_train = time.perf_counter()
        stats.update(self.update(rollout, timings))
        timings["training_s"] = time.perf_counter() - t_train
        self.kl_ctl.update(stats["kl/k1"], rollout.size * self.world)  # the whole step's rollouts
        stats["kl/coef"] = kl_coef
        stats["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        timings["step_s"] = time.perf_counter() - start
        stats.update({f"time/{k}": v for k, v in distributed.all_reduce_stats(timings, {"step_s": max}).items()})
        if self.world > 1:
            stats["time/communication_share"] = stats["time/allreduce_s"] / max(stats["time/step_s"], 1e-9)
        self.step += 1
        if self.is_main:
            self._maybe_log_samples(rollout)
        return stats

    def update(self, r: Rollout, timings: dict | None = None) -> dict:
        """PPO epochs x mini-batches x micro-batches on one rollout. Returns mean training stats.

        Each loss is a token mean over the whole mini-batch (all its micro-batches, on all processes),
        so the summed gradients are those of one pass over the global mini-batch.
        """
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            self.actor.peft.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        acc: dict[str, list[float]] = {}
        device = r.input_ids.device
        comm = 0.0
        group = self.train_group()
        for _ in range(cfg.ppo_epochs):
            for mb in mini_batch_rows(r.size, group, cfg.mini_batch_size // group, gen, self.world, self.rank):
                self.optimizer.zero_grad(set_to_none=True)
                tokens = distributed.all_reduce_sum(r.response_mask[mb.to(device)].sum())
                # a mini-batch may hold none of this process's rows: it then adds a zero gradient (sum_gradients)
                for micro in mb.split(cfg.per_device_train_batch_size) if len(mb) else ():
                    for k, v in self._micro_step(r.select(micro.to(device)), float(tokens), group).items():
                        acc.setdefault(k, []).append(v)
                t_comm = time.perf_counter()
                distributed.sum_gradients(self.params)
                comm += time.perf_counter() - t_comm
                norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                if not torch.isfinite(norm):
                    self._stop("the gradient norm is NaN/inf")
                acc.setdefault("train/grad_norm", []).append(float(norm))
                self.optimizer.step()
        self.actor.peft.eval()
        if timings is not None:
            timings["allreduce_s"] = comm
        reduce = {"policy/ratio_max": max, "train/tokens": sum, "train/response_tokens": sum}
        local = {k: reduce.get(k, lambda x: sum(x) / len(x))(v) for k, v in acc.items()}
        return distributed.all_reduce_stats(local, reduce)

    def train_group(self) -> int:
        """Rows per group in the training passes: samples_per_prompt where each micro-batch can hold whole
        groups (and ``share_prompt_pass``), else 1 (rows shuffled one by one)."""
        cfg, k = self.cfg, self.cfg.samples_per_prompt
        if k < 2 or not cfg.share_prompt_pass or not self.actor.shares_prompts or cfg.gradient_checkpointing:
            return 1
        if cfg.mini_batch_size % k or cfg.per_device_train_batch_size % k:
            return 1
        return k

    def _micro_step(self, d: dict, tokens: float, group: int = 1) -> dict:
        """Forward/backward of one micro-batch; each loss is its share of the mean over the mini-batch's
        ``tokens`` response tokens (all micro-batches, all processes). ``group``: rows per shared prompt."""
        cfg, actor = self.cfg, self.actor
        m = d["response_mask"]
        share = float(m.sum()) / max(tokens, 1.0)  # turns a share of the mini-batch mean into this micro-batch's mean
        out = actor.policy_forward(d["input_ids"], d["attention_mask"], d["response_ids"], cfg.temperature,
                                   with_entropy=cfg.entropy_coef > 0, trunk=d.get("policy_trunk"), group=group)
        pg_loss, pg_stats = policy_loss(out["logprobs"], d["logprobs"], d["advantages"], m, cfg.cliprange, tokens)
        ratio_max = float(pg_stats["ratio_max"])
        if cfg.max_ratio and ratio_max > cfg.max_ratio:
            self._stop(f"exploding probability ratio {ratio_max:.3g} > max_ratio {cfg.max_ratio:g}")
        loss = pg_loss
        stats = {"policy/loss": float(pg_loss.detach()) / max(share, 1e-12),
                 "policy/clipfrac": float(pg_stats["clipfrac"]),
                 "policy/approx_kl": float(pg_stats["approx_kl"]), "policy/ratio_max": ratio_max,
                 "train/tokens": d["input_ids"].numel(), "train/response_tokens": m.numel()}  # per forward pass
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * token_mean(out["entropy"], m, tokens)
        if cfg.kl_in == "loss":
            kl_loss = kl_penalty_loss(out["logprobs"], d["ref_logprobs"], m, cfg.kl_estimator, tokens)
            loss = loss + self.kl_ctl.value * kl_loss
            stats["policy/kl_loss"] = float(kl_loss.detach()) / max(share, 1e-12)
        if actor.value_model == "none":  # critic-free: the policy loss is all there is
            self._backward(loss, "policy loss")
            return stats
        if actor.value_model == "separate":  # two graphs, freed one after the other
            self._backward(loss, "policy loss")
            values = actor.value_forward(d["input_ids"], d["attention_mask"], d["input_ids"].shape[1] - m.shape[1],
                                         trunk=d.get("value_trunk"))
            vf_loss, vf_stats = value_loss(values, d["values"], d["returns"], m, cfg.cliprange_value, tokens)
            self._backward(cfg.vf_coef * vf_loss, "value loss")
        else:
            vf_loss, vf_stats = value_loss(out["values"], d["values"], d["returns"], m, cfg.cliprange_value, tokens)
            self._backward(loss + cfg.vf_coef * vf_loss, "loss")
        stats.update({"value/loss": float(vf_loss.detach()) / max(share, 1e-12),
                      "value/clipfrac": float(vf_stats["vf_clipfrac"])})
        return stats

    def _backward(self, loss, what: str) -> None:
        if not torch.isfinite(loss):
            self._stop(f"the {what} is NaN/inf")
        loss.backward()

    # logging, checkpoints

    def _maybe_log_samples(self, r: Rollout) -> None:
        every = self.cfg.sample_every
        if not every or (self.step % every and self.step != 1):
            return
        rows = [{"step": self.step, "prompt": prompt_text(r.prompts[i]), "response": r.responses[i],
                 "score": float(r.raw_scores[i])} for i in range(min(self.cfg.num_samples, r.size))]
        lines = [f"[step {self.step}] score {x['score']:.3f} | {x['prompt']!r} -> {x['response']!r}" for x in rows]
        tqdm.write("\n".join(lines), file=sys.stderr)
        with open(self.out_dir / "logs" / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)
        if self.logger is not None:
            table = "| score | prompt | response |\n|---|---|---|\n" + "\n".join(
                f"| {x['score']:.3f} | {x['prompt']} | {x['response']} |" for x in rows)
            self.logger.text(self.step, "samples", table)

    def state(self) -> dict:
        return {"step": self.step, "world_size": self.world, "kl_controller": self.kl_ctl.state_dict(),
                "stream": self.stream.state_dict(),
                "history": self.history, "total_steps": self.total_steps,
                "monitor": self.monitor.state_dict() if self.monitor is not None else []}

    # over-optimisation monitor

    @property
    def best_policy_dir(self) -> Path:
        return self.out_dir / "best_policy"

    def selected_point(self):
        """The monitor point whose policy is exported (None for select_checkpoint: last)."""
        key = SELECT_KEYS.get(self.cfg.select_checkpoint)
        return best_point(self.monitor.points, key) if key and self.monitor is not None else None

    def _monitor(self, kl: float) -> dict:
        """Score the held-out answers now; keep the policy if it is the best so far. Returns log entries.
        Rank 0 scores and keeps (the others have the same weights and wait)."""
        if not self.is_main:
            distributed.barrier()
            return {}
        point = self.monitor.evaluate(self.actor, self.tokenizer, self.step, kl)
        best = self.selected_point()
        if best is not None and best.step == self.step:
            self.actor.save_policy(self.best_policy_dir, self.base_name_or_path)
            (self.best_policy_dir / "STEP").write_text(str(self.step))
        self.monitor.plot(self.out_dir / "logs" / "monitor.png")
        gold = "" if point.gold is None else f", gold {point.gold:.3f}"
        empty = f", {point.empty} empty answers" if point.empty else ""
        tqdm.write(f"[monitor step {self.step}] held-out proxy {point.proxy:.3f}{gold}, sqrt KL {point.sqrt_kl:.2f}"
                   f"{empty}", file=sys.stderr)
        row = {"monitor/proxy": point.proxy, "monitor/sqrt_kl": point.sqrt_kl, "monitor/length": point.length,
               "monitor/empty": point.empty}
        if point.gold is not None:
            row["monitor/gold"] = point.gold
        distributed.barrier()
        return row

    def save(self) -> Path:
        """Rank 0 writes the checkpoint, with every process's RNG state; all processes wait for it."""
        rngs = distributed.all_gather_object(ckpt.rng_state())
        if self.is_main:
            ckpt.save_checkpoint(
                self.ckpt_dir, self.step, actor=self.actor, optimizer=self.optimizer, scheduler=self.scheduler,
                state=self.state(), base_name_or_path=self.base_name_or_path, keep=self.cfg.save_total_limit,
                rng_states=rngs)
        distributed.barrier()
        self.last_checkpoint = self.ckpt_dir / ckpt.step_dir_name(self.step)
        self.saved_step = self.step
        return self.last_checkpoint

    def resume(self, path) -> None:
        state = ckpt.load_checkpoint(path, actor=self.actor, optimizer=self.optimizer, scheduler=self.scheduler,
                                     rank=self.rank)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            raise UserError(f"checkpoint {path} was written by a run on {saved_world} process(es); resume it on "
                            f"{saved_world}, not {self.world}")
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if state["stream"].get("n") != len(self.prompts):
            raise UserError(f"checkpoint {path} was made with {state['stream'].get('n')} prompts, "
                            f"this run has {len(self.prompts)}")
        self.stream.load_state_dict(state["stream"])
        self.history = list(state.get("history", []))
        if self.monitor is not None:
            self.monitor.load_state_dict(state.get("monitor", []))
        self.last_checkpoint = Path(path)
        self.saved_step = self.step
        if self.is_main:
            _truncate_jsonl(self.out_dir / "logs" / "metrics.jsonl", self.step)
            _truncate_jsonl(self.out_dir / "logs" / "samples.jsonl", self.step)

    def restore(self) -> None:
        """Clear stale checkpoint folders and, with ``resume_from_checkpoint``, load that checkpoint: a checkpoint
        that does not fit this model or config stops here, before the stage writes anything."""
        if self.is_main:
            ckpt.clean_stale(self.ckpt_dir)
        distributed.barrier()
        if self.cfg.resume_from_checkpoint:
            path = ckpt.resolve_resume(self.cfg.resume_from_checkpoint, self.ckpt_dir)
            self.resume(path)
            if self.is_main:
                tqdm.write(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def train(self) -> dict:
        """Run until ``total_steps`` (from where :meth:`restore` left it); returns the summary written to
        metrics.json."""
        cfg = self.cfg
        watch = time.perf_counter()
        budget = TimeBudget(cfg.max_train_seconds, cfg.train_clock)
        self.stopped_by_budget = False
        bar = tqdm(total=self.total_steps, initial=self.step, desc="ppo", unit="step",
                   disable=not (cfg.progress and self.is_main))
        if self.monitor is not None and self.step == 0:  # the starting policy: the point at KL 0
            row = self._monitor(0.0)
            if self.logger is not None:
                self.logger.log(0, row)
        while self.step < self.total_steps:
            stats = self.ppo_step()
            self.history.append({k: stats[k] for k in ("reward/mean", "score/raw_mean", "kl/k1")})
            monitored = self.monitor is not None and (self.step % cfg.eval_steps == 0 or self.step == self.total_steps)
            if monitored:
                stats.update(self._monitor(stats["kl/k1"]))
            if self.logger is not None and (monitored or self.step % cfg.logging_steps == 0
                                            or self.step in (1, self.total_steps)):
                self.logger.log(self.step, stats)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl/k1']:.3f}")
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save()
            if self.step < self.total_steps and budget.exhausted():
                self.stopped_by_budget = True
                if self.is_main:
                    tqdm.write(f"stopping after step {self.step}: max_train_seconds {cfg.max_train_seconds:g} "
                               f"({cfg.train_clock} clock) used", file=sys.stderr)
                break
        bar.close()
        if self.saved_step != self.step:
            self.save()
        return self._summary(time.perf_counter() - watch)

    def _summary(self, seconds: float) -> dict:
        h = self.history
        (reward_first, reward_last), (score_first, score_last) = (first_and_last(h, key)
                                                                  for key in ("reward/mean", "score/raw_mean"))
        return {
            "steps": self.step,
            "rollouts": self.step * self.cfg.rollout_batch_size,
            "reward_first_steps": reward_first,
            "reward_last_steps": reward_last,
            "score_first_steps": score_first,
            "score_last_steps": score_last,
            "kl_last": h[-1]["kl/k1"] if h else 0.0,
            "kl_coef_final": self.kl_ctl.value,
            "reward_normalization": self.normalization,
            "wall_time_s": round(seconds, 2),
            "stopped_by_time_budget": self.stopped_by_budget,
            "world_size": self.world,
            "peak_rss_mb": distributed.all_gather_object(_peak_rss_mb()),  # one per process
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            **({"monitor": [p.as_dict() for p in self.monitor.points]} if self.monitor is not None else {}),
        }


def first_and_last(history: list[dict], key: str, most: int = 5) -> tuple[float, float]:
    """The mean of ``key`` over the first and over the last k = min(``most``, steps // 2) steps (at least 1): two
    windows that never overlap (but in a 1-step run), so a short run's "first -> last" shows a change."""
    k = min(most, max(1, len(history) // 2))
    mean = lambda rows: sum(r[key] for r in rows) / max(len(rows), 1)  # noqa: E731
    return mean(history[:k]), mean(history[-k:])


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines logged after ``max_step`` by a run that was interrupted later."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= max_step]
    path.write_text("".join(line + "\n" for line in keep))
