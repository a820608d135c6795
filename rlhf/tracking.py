"""Training logs: one JSONL file plus TensorBoard, shared by every stage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsLogger:
    """Append ``{"step": .., **metrics}`` lines to ``log_dir/metrics.jsonl``; mirror scalars to TensorBoard."""

    def __init__(self, log_dir: str | os.PathLike, tensorboard: bool = True, purge_step: int | None = None):
        """``purge_step``: a run resumed from step s passes s + 1: TensorBoard drops the events an earlier run
        logged from that step on (as the resume cuts ``metrics.jsonl`` back), so no step has two points."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_dir / "metrics.jsonl", "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._file.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class LoggerCallback(TrainerCallback):
    """Send a ``transformers.Trainer``'s logs to a :class:`MetricsLogger`."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.logger.log(state.global_step, logs)
