"""Batched sampling from a causal LM with the tokenizer's chat template.

Prompts are left-padded so that every row's last prompt token sits at the
same position and generation runs as one batch with the KV cache. The same
code serves ``rlhf generate``, candidate generation, evaluation and PPO
rollouts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf.data import to_messages
from rlhf.packed_weights import sampling_weights


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled; ``do_sample=False`` is greedy decoding."""

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


def chat_prompt_texts(tokenizer, prompts: list[Any]) -> list[str]:
    """Apply the chat template (with the generation prompt) to strings or message lists."""
    return [
        tokenizer.apply_chat_template(to_messages(p), add_generation_prompt=True, tokenize=False) for p in prompts
    ]


def encode_prompts(tokenizer, prompts: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` (B, P) for a batch of prompts."""
    texts = chat_prompt_texts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@contextmanager
def plain_generation_config(model):
    """Generate with the settings the caller passes and nothing else.

    ``generate`` fills every setting the call leaves unset from the model's own ``generation_config``
    (a checkpoint may ship ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_length``, bad-word
    lists, ...). Those reshape the sampling distribution, while PPO's log-probs (and the eval's KL) are
    a plain softmax(logits / T). Inside this context the model's ``generation_config`` holds only its
    special token ids; it is restored afterwards. ``model``: an HF model or a ``PeftModel``.
    """
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    ids = {k: getattr(saved, k, None) for k in SPECIAL_TOKEN_KEYS}
    target.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        target.generation_config = saved


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[Any], settings: SamplingSettings, num_return_sequences: int = 1):
    """Generate for one batch. Returns (prompt_ids (B*K, P), prompt_mask (B*K, P), response_ids (B*K, R)).

    Rows are grouped per prompt: rows ``i*K .. i*K+K-1`` belong to prompt ``i``.
    Response positions after the sequence ended hold the pad token.
    """
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, prompts, device)
    width = enc["input_ids"].shape[1]
    if is_prompt_learning(model):  # one prompt at a time: PEFT ignores position ids there, so no left padding
        answers = [uncached_generate(model, encode_prompts(tokenizer, [p], device), settings, num_return_sequences,
                                     tokenizer.pad_token_id, tokenizer.eos_token_id) for p in prompts]  # fmt: skip
        longest = max(a.shape[1] for a in answers)
        responses = torch.cat([torch.nn.functional.pad(a, (0, longest - a.shape[1]), value=tokenizer.pad_token_id)
                               for a in answers])  # fmt: skip
    else:
        with sampling_weights(model), plain_generation_config(model):
            out = model.generate(
                **enc,
                **settings.generate_kwargs(),
                num_return_sequences=num_return_sequences,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        responses = out[:, width:]
    prompt_ids = enc["input_ids"].repeat_interleave(num_return_sequences, dim=0)
    prompt_mask = enc["attention_mask"].repeat_interleave(num_return_sequences, dim=0)
    return prompt_ids, prompt_mask, responses


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (B, T): each row counts from 0 at its first real token."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def is_prompt_learning(model) -> bool:
    """A PEFT prompt or prefix tuning model: virtual tokens in front of every forward pass."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def uncached_generate(model, enc: dict, settings: SamplingSettings, num_return_sequences: int, pad_token_id: int,
                      eos_token_id: int) -> torch.Tensor:  # fmt: skip
    """Sampling (or greedy decoding) by a whole forward pass per token, as the model is trained: the prompt
    repeated K times (B*K, P), then the new tokens. For prompt and prefix tuning, whose virtual tokens PEFT 0.21's
    ``generate`` leaves out of its cached decoding steps (call it one prompt at a time: PEFT ignores the position
    ids of these models, so left padding would shift them). Returns the new tokens (B*K, R)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ids = enc["input_ids"].repeat_interleave(num_return_sequences, dim=0)
    mask = enc["attention_mask"].repeat_interleave(num_return_sequences, dim=0)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)] if settings.do_sample else [])
    if settings.do_sample and settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.do_sample and settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(settings.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1, :].float()
        if settings.do_sample:
            token = torch.multinomial(torch.softmax(warpers(ids, logits), dim=-1), 1)[:, 0]
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        ids, mask = torch.cat([ids, token[:, None]], dim=1), torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        done |= token == eos_token_id
        if bool(done.all()):
            break
    return ids[:, enc["input_ids"].shape[1] :]


def decode_responses(tokenizer, response_ids: torch.Tensor) -> list[str]:
    """Text of each response up to (not including) its first EOS."""
    texts = []
    for row in response_ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def generate_responses(
    model,
    tokenizer,
    prompts: list[Any],
    *,
    num_return_sequences: int = 1,
    max_new_tokens: int = 64,
    do_sample: bool = True,
    temperature: float = 0.7,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """Sample ``num_return_sequences`` responses per prompt; returns one list of texts per prompt."""
    settings = SamplingSettings(max_new_tokens, do_sample, temperature, top_p, top_k)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    results: list[list[str]] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        _, _, response_ids = sample_batch(model, tokenizer, chunk, settings, num_return_sequences)
        texts = decode_responses(tokenizer, response_ids)
        k = num_return_sequences
        results.extend(texts[i * k : (i + 1) * k] for i in range(len(chunk)))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return results


def response_mask(tokenizer, response_ids: torch.Tensor) -> torch.Tensor:
    """(B, R) 1 for response tokens up to and including the first EOS, 0 after it."""
    is_eos = response_ids == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def response_log_dists(
    model, prompt_ids, prompt_mask, response_ids, resp_mask, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / ``temperature``) over the vocabulary at each response position (B, R, V): the
    distribution of token t given x, y_<t.

    prompt_ids/prompt_mask: (B, P) left-padded; response_ids/resp_mask: (B, R).
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+R)
    attention = torch.cat([prompt_mask, resp_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions(attention)).logits
    width = response_ids.shape[1]  # counted from the end: a prompt-tuning model puts virtual tokens in front
    return torch.log_softmax(logits[:, -width - 1 : -1].float() / temperature, dim=-1)  # position t predicts token t
