"""TRL's ``RewardTrainer`` with the reward read where our scorer reads it.

TRL computes rewards with ``model(**inputs).logits``; ``transformers``' sequence-classification
head pools the last token that is not ``pad_token_id``. With pad = EOS (SmolLM2) that is the
token before the EOS we append, while PPO and :class:`~reward.scorer.RewardScorer` score the EOS
position. This subclass replaces only the reward computation: rewards come from
:func:`reward.pooling.pooled_rewards` (with the config's ``pooling``) and the loss from
:func:`reward.losses.bradley_terry_loss`; data preparation, collation, optimisation and TRL's
logged metrics (accuracy, margin, min/mean/max reward, tokens) are TRL's.

With a ``length_head`` (``length_debias: length_head``, ODIN) the pair loss is taken on
``r_Q + r_L`` (quality head = the model's ``score``, length head = that extra ``nn.Linear`` on the
same pooled features) plus :func:`reward.losses.length_disentangle_loss` and
:func:`reward.losses.orthogonality_loss`; the logged accuracy/margin/rewards are the quality head's,
which is what scoring uses. While training the length head is a submodule of the model (so the
optimizer and gradient clipping include it); it is saved apart from the adapter.

On N processes (``accelerate launch``) each process takes its share of every batch: the forward pass goes
through the model as the trainer wraps it (:func:`reward.pooling.pooled_through`), so DDP (or DeepSpeed,
FSDP) synchronises the gradients; the frozen base has no gradients to synchronise. The length head's
correlation term is taken over each process's micro-batch, as it is over each micro-batch under gradient
accumulation (N processes train like one with N accumulation steps). Logged metrics are
gathered over the processes; periodic evaluations run the whole held-out set on every process
(:class:`~rlhf.hf_trainer.WholeEvalSet`).

Distinct responses are scored once per batch (:class:`UniqueCollator`): the pairs of a batch point
into its distinct sequences. With ``groups`` (a key per pair, e.g. its prompt) the batches are
filled prompt by prompt in a shuffled prompt order (:class:`GroupedSampler`), so the up to K(K-1)/2
comparisons among one prompt's K candidates share K forward passes, as InstructGPT trains on all
comparisons of a prompt together. Pairs that share no response cost what they did.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from reward.losses import bradley_terry_loss, length_disentangle_loss, orthogonality_loss, pearson_t, unique_rows
from reward.modeling import head_linear, trunk_and_head
from reward.pooling import apply_head, needs_response_mask, pooled_through, response_tail_mask
from rlhf.hf_trainer import WholeEvalSet

LENGTH_COLUMNS = ("chosen_len", "rejected_len")
LENGTH_HEAD = "length_head"  # attribute of the sequence-classification model while training


class UniqueCollator(DataCollatorForPreference):
    """A batch of pairs as its distinct sequences: ``input_ids``/``attention_mask`` (U, T) right-padded,
    ``pair_index`` (B, 2) long (rows of each pair's chosen and rejected sequence), ``margin`` (B,) when
    the data has one, and with ``with_lengths`` ``lengths`` (U,) float (response tokens of each row)."""

    def __init__(self, pad_token_id: int, with_lengths: bool = False):
        super().__init__(pad_token_id=pad_token_id)
        self.with_lengths = with_lengths

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from torch.nn.utils.rnn import pad_sequence

        sequences, index = unique_rows([e["chosen_ids"] for e in examples], [e["rejected_ids"] for e in examples])
        rows = [torch.tensor(s) for s in sequences]
        out = {
            "input_ids": pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0),
            "pair_index": torch.tensor(index, dtype=torch.long),
        }
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        if self.with_lengths:
            lengths = [0.0] * len(sequences)
            for e, (c, r) in zip(examples, index):
                lengths[c], lengths[r] = float(e["chosen_len"]), float(e["rejected_len"])
            out["lengths"] = torch.tensor(lengths, dtype=torch.float)
        return out


class GroupedSampler(torch.utils.data.Sampler):
    """Indices group after group: the groups in a seeded order that changes every epoch, each group's
    indices together (in a seeded order too). ``groups[i]`` is the key of row i."""

    def __init__(self, groups: list, seed: int):
        self.members: dict = {}
        for i, key in enumerate(groups):
            self.members.setdefault(key, []).append(i)
        self.keys = list(self.members)
        self.seed, self.epoch, self.n = seed, 0, len(groups)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        self.epoch += 1
        for k in torch.randperm(len(self.keys), generator=gen).tolist():
            rows = self.members[self.keys[k]]
            yield from (rows[j] for j in torch.randperm(len(rows), generator=gen).tolist())


class PairwiseRewardTrainer(WholeEvalSet, RewardTrainer):
    """``RewardTrainer`` scoring through :func:`pooled_rewards`; the loss is ``-log sigmoid(r_c - r_r - m)``."""

    def __init__(self, *args, length_head: torch.nn.Module | None = None, length_coef: float = 1.0,
                 orthogonal_coef: float = 1.0, groups: list | None = None, pooling: str = "last", **kwargs):
        self.with_lengths = length_head is not None or needs_response_mask(pooling)
        if kwargs.get("data_collator") is None:
            tokenizer = kwargs["processing_class"]
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            kwargs["data_collator"] = UniqueCollator(pad_token_id=pad, with_lengths=self.with_lengths)
        super().__init__(*args, **kwargs)
        self.groups = groups
        self.pooling = pooling
        self.length_head = length_head
        self.length_coef = length_coef
        self.orthogonal_coef = orthogonal_coef
        if length_head is not None:
            # a submodule of the model, so the optimizer, gradient clipping and device moves include it;
            # the saved adapter does not (PEFT saves LoRA + modules_to_save only)
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            length_head.to(next(self.model.parameters()).device).requires_grad_(True)
            base.add_module(LENGTH_HEAD, length_head)

    def _get_train_sampler(self, train_dataset=None):
        if self.groups is None:
            return super()._get_train_sampler(train_dataset)
        return GroupedSampler(self.groups, self.args.seed)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.with_lengths:
            self._signature_columns = list(self._signature_columns) + [
                c for c in LENGTH_COLUMNS if c not in self._signature_columns
            ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        trunk, head = trunk_and_head(self.accelerator.unwrap_model(model))
        pair = inputs["pair_index"]  # (B, 2) rows of the U distinct sequences
        response = None
        if needs_response_mask(self.pooling):  # the response's tokens and the EOS after them
            response = response_tail_mask(inputs["attention_mask"], inputs["lengths"] + 1)
        pooled, rewards = pooled_through(model, head, inputs["input_ids"], inputs["attention_mask"],
                                         self.pooling, trunk, response)  # (U, H, 2H or 3H), (U,)
        ranked = rewards
        if self.length_head is not None:
            length_rewards = apply_head(self.length_head, pooled)  # (U,)
            ranked = rewards + length_rewards
        chosen, rejected = ranked[pair[:, 0]], ranked[pair[:, 1]]  # (B,), (B,)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"))
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        if self.length_head is not None:
            lengths = inputs["lengths"].to(rewards.device)
            loss = loss + self.length_coef * length_disentangle_loss(rewards, length_rewards, lengths)
            loss = loss + self.orthogonal_coef * orthogonality_loss(head_linear(head).weight, self.length_head.weight)
            chosen, rejected = rewards[pair[:, 0]], rewards[pair[:, 1]]  # what scoring uses, for the logged metrics

        with torch.no_grad():
            self._log_batch(mode, inputs["attention_mask"], rewards, chosen, rejected)
            if self.length_head is not None:
                self._metrics[mode]["length_corr_quality"].append(pearson_t(rewards, lengths).item())
                self._metrics[mode]["length_corr_length_head"].append(pearson_t(length_rewards, lengths).item())
        if return_outputs:
            return loss, {"logits": torch.stack([chosen, rejected], dim=1)}  # (B, 2)
        return loss

    def _log_batch(self, mode: str, attention_mask, rewards, chosen, rejected) -> None:
        """Batch metrics over all processes: rewards of the distinct rows (U,), accuracy and margin of the
        pairs (B,) (an evaluation pass's padding repeats are dropped by ``gather_for_metrics``)."""
        acc = self.accelerator
        summary = torch.stack([rewards.min(), rewards.max(), rewards.sum(), rewards.new_tensor(float(rewards.numel())),
                               attention_mask.sum().to(rewards.device, torch.float)])  # fmt: skip
        low, high, total, count, tokens = acc.gather(summary[None]).T  # each (world,)
        pairs = acc.gather_for_metrics(torch.stack([chosen, rejected], dim=1).detach())  # (sum of B, 2)
        if mode == "train":
            self._total_train_tokens += int(tokens.sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        self._metrics[mode]["min_reward"].append(low.min().item())
        self._metrics[mode]["mean_reward"].append((total.sum() / count.sum()).item())
        self._metrics[mode]["max_reward"].append(high.max().item())
        self._metrics[mode]["accuracy"].append((pairs[:, 0] > pairs[:, 1]).float().mean().item())
        self._metrics[mode]["margin"].append((pairs[:, 0] - pairs[:, 1]).mean().item())
