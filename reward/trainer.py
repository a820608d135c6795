"""TRL's ``RewardTrainer`` with the reward read where our scorer reads it.

TRL computes rewards with ``model(**inputs).logits``; ``transformers``' sequence-classification
head pools the last token that is not ``pad_token_id``. With pad = EOS (SmolLM2) that is the
token before the EOS we append, while PPO and :class:`~reward.scorer.RewardScorer` score the EOS
position. This subclass replaces only the reward computation: rewards come from
:func:`reward.modeling.pooled_rewards` (last attended token) and the loss from
:func:`reward.losses.bradley_terry_loss`; data preparation, collation, optimisation and TRL's
logged metrics (accuracy, margin, min/mean/max reward, tokens) are TRL's.
Single process only (the trunk is called directly, not through a DDP wrapper).
"""

from __future__ import annotations

import torch
from trl import RewardTrainer

from reward.losses import bradley_terry_loss
from reward.modeling import pooled_rewards, trunk_and_head


class PairwiseRewardTrainer(RewardTrainer):
    """``RewardTrainer`` scoring through :func:`pooled_rewards`; the loss is ``-log sigmoid(r_c - r_r - m)``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        trunk, head = trunk_and_head(self.accelerator.unwrap_model(model))
        rewards = pooled_rewards(trunk, head, inputs["input_ids"], inputs["attention_mask"])  # (2B,)
        chosen, rejected = torch.chunk(rewards, chunks=2)  # (B,), (B,)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"))
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)

        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            self._metrics[mode]["min_reward"].append(rewards.min().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            self._metrics[mode]["max_reward"].append(rewards.max().item())
            self._metrics[mode]["accuracy"].append((chosen > rejected).float().mean().item())
            self._metrics[mode]["margin"].append((chosen - rejected).mean().item())
        if return_outputs:
            return loss, {"logits": torch.stack([chosen, rejected], dim=1)}  # (B, 2)
        return loss
