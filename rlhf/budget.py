"""A training-time budget shared by every stage: ``max_train_seconds`` on the ``train_clock``.

``wall`` counts elapsed seconds; ``cpu`` counts the CPU seconds this process has used (all its threads),
which barely moves when other jobs share the cores, so runs compared "at equal CPU time" stay comparable on a
loaded machine. A stage checks the budget after each optimizer step (PPO: after each rollout + update step)
and stops there; what it trained so far is saved as usual. On N processes rank 0's clock decides for all.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from transformers import TrainerCallback

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class TimeBudget:
    """``exhausted()`` once ``seconds`` have passed on ``clock`` since construction (never when seconds is None)."""

    def __init__(self, seconds: Optional[float], clock: str = "wall"):
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; expected one of {sorted(CLOCKS)}")
        self.seconds = seconds
        self.clock = clock
        self._now = CLOCKS[clock]
        self._start = self._now()

    def spent(self) -> float:
        return self._now() - self._start

    def exhausted(self) -> bool:
        """The same answer on every process (rank 0's); False without a budget."""
        if self.seconds is None:
            return False
        from rlhf import distributed

        return bool(distributed.all_gather_object(self.spent() >= self.seconds)[0])


class TimeBudgetCallback(TrainerCallback):
    """Stop a ``transformers.Trainer`` after the optimizer step at which the budget runs out."""

    def __init__(self, seconds: Optional[float], clock: str = "wall"):
        self.seconds, self.clock = seconds, clock
        self.budget: Optional[TimeBudget] = None
        self.stopped_at: Optional[int] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.budget = TimeBudget(self.seconds, self.clock)

    def on_step_end(self, args, state, control, **kwargs):
        last = state.max_steps and state.global_step >= state.max_steps  # the schedule ends here anyway
        if self.budget is not None and not last and self.budget.exhausted():
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def stopped_by_budget(trainer) -> bool:
    """Did a :class:`TimeBudgetCallback` of this ``transformers.Trainer`` end its training?"""
    return any(isinstance(c, TimeBudgetCallback) and c.stopped_at is not None
               for c in trainer.callback_handler.callbacks)


def stage_callbacks(cfg, logger=None) -> list:
    """The callbacks every ``transformers``-based stage gets: its metrics logger and its time budget."""
    from rlhf.tracking import LoggerCallback

    callbacks: list = [LoggerCallback(logger)] if logger else []
    if cfg.max_train_seconds is not None:
        callbacks.append(TimeBudgetCallback(cfg.max_train_seconds, cfg.train_clock))
    return callbacks
