"""What the reward model sees, how it is built, and the folder it is saved in.

Input (the same in training, ``RewardScorer.score`` and PPO's ``score_tokens``)::

    ids = tokenize(chat_template(prompt, add_generation_prompt=True)) + tokenize(response) + [eos]

left-truncated to ``max_length`` tokens, so the response and its EOS are always kept. This is
exactly the token layout of a policy rollout (left-padded chat prompt, then the sampled tokens
up to and including EOS).

How one scalar comes out of it (pooling, the head): :mod:`reward.pooling`.

The folder a trained RM lives in is described by ``reward_model.json`` (see :func:`write_metadata`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reward.pooling import embedding_parts, feature_head_like, pooling_description, uses_embeddings
from rlhf.data import to_messages
from rlhf.errors import ConfigError, UserError
from rlhf.models import check_adapter, hooked_adapter_type, not_peft_message, read_adapter_config
from rlhf.outputs import read_json

METADATA_FILE = "reward_model.json"
STATS_FILE = "reward_stats.json"
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
LENGTH_HEAD_FILE = "length_head.safetensors"
SFT_COPY = "sft_adapter"
REFT_HEAD_FILE = "score_head.safetensors"  # method loreft: the score head (the interventions: rlhf.hooked files)
FORMAT = "rlhf-reward-model"
ENSEMBLE_FORMAT = "rlhf-reward-ensemble"
INPUT_FORMAT = "chat_template(prompt, add_generation_prompt=True) + response + eos, left-truncated to max_length"

# encoding


def encode_for_reward(
    tokenizer, prompts: list[Any], responses: list[str], max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids the RM scores for each (prompt, response), and each response's length in tokens.

    ``prompts`` are strings or message lists; the template is applied with the generation prompt.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if tokenizer.eos_token_id is None:
        raise UserError("the reward model's tokenizer has no EOS token")
    cache: dict[str, list[int]] = {}
    prompt_ids = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=False)
        if text not in cache:
            cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids.append(cache[text])
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    seqs = [(p + r + [tokenizer.eos_token_id])[-max_length:] for p, r in zip(prompt_ids, response_ids)]
    return seqs, [len(r) for r in response_ids]


def pad_right(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


# model structure


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder trunk, score head) of a ``*ForSequenceClassification`` model, PEFT-wrapped or not."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    trunk = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = getattr(base, "score", None)
    if trunk is None or head is None:
        raise UserError(f"{type(base).__name__} has no decoder trunk and 'score' head to build a reward model on")
    return trunk, head


def head_linear(head: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` behind a head (unwrapping PEFT's modules_to_save wrapper)."""
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:
        active = getattr(head, "active_adapters", None) or list(copies.keys())
        return copies[active[0]]
    return head


# building


def build_reward_model(
    base: str, sft_adapter: str | None, dtype: torch.dtype, device: torch.device, seed: int, trunk_layers: int = 0,
    pooling: str = "last",
):
    """``AutoModelForSequenceClassification`` (num_labels=1) on ``base``, with a LoRA SFT adapter merged first
    (a hooked SFT adapter, which only a LoReFT reward model takes, is attached frozen: :mod:`reward.reft`).
    ``trunk_layers = N > 0`` keeps the lowest N blocks only (then the final norm and the head), see
    :func:`keep_lower_blocks`. A ``pooling`` that reads the input embeddings too gets a
    :class:`~reward.pooling.FeatureHead` as its ``score`` (the usual head's start, 0 on the embedding part).

    The score head is initialised after ``transformers.set_seed(seed)``, so runs are reproducible.
    """
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from safetensors import SafetensorError

    from rlhf.models import attention_choice, error_line, load_model, resolve_model_path

    path = resolve_model_path(base)
    set_seed(seed)
    try:
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                       **attention_choice(dtype, device))
    except (OSError, ValueError, SafetensorError) as exc:  # a missing or truncated file, an unknown model type
        raise UserError(f"cannot load model {base}: {error_line(exc)}") from None
    hooked = hooked_adapter_type(sft_adapter)
    if hooked is not None:
        check_adapter(sft_adapter, hooked=True)
        trunk, _ = trunk_and_head(model)
        hooked.load(trunk, sft_adapter)  # on the trunk: the reward interventions go on the model itself
        getattr(trunk, hooked.attribute).requires_grad_(False)
    elif sft_adapter:
        check_lora_adapter(sft_adapter)
        merged = load_model(base, adapter=sft_adapter, dtype=dtype, device=torch.device("cpu"), merge=True)
        trunk, _ = trunk_and_head(model)
        trunk.load_state_dict(getattr(merged, merged.base_model_prefix).state_dict())
        del merged
    if trunk_layers:
        keep_lower_blocks(model, trunk_layers)
    if uses_embeddings(pooling):
        model.score = feature_head_like(model.score, embedding_parts(pooling))
    return model.to(device)


def keep_lower_blocks(model: nn.Module, n: int) -> None:
    """Drop every block above the lowest ``n`` of a ``*ForSequenceClassification`` model (in place): the final
    norm and the score head then read block ``n - 1``'s output. Scoring an attached RM runs the same blocks
    of the policy's trunk (:func:`reward.pooling.pooled_hidden` with ``stop = n``)."""
    trunk, _ = trunk_and_head(model)
    total = len(trunk.layers)
    if not 1 <= n <= total:
        raise ConfigError(f"config key 'trunk_layers' is {n} but the model has {total} blocks (0 = all of them)")
    trunk.layers = trunk.layers[:n]
    config = model.config.get_text_config()
    config.num_hidden_layers = n
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n]


def check_lora_adapter(adapter: str) -> dict:
    """The adapter_config of a LoRA adapter folder; ConfigError for anything else."""
    hooked = hooked_adapter_type(adapter)
    if hooked is not None:
        raise ConfigError(f"config key 'sft_adapter': {not_peft_message(adapter, hooked.method)}")
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"config key 'sft_adapter': {adapter} has no adapter_config.json")
    check_adapter(adapter)
    config = read_adapter_config(adapter)
    if config.get("peft_type") != "LORA":
        raise ConfigError(
            f"config key 'sft_adapter': only LoRA adapters can be merged, {adapter} is {config.get('peft_type')}; "
            "for a fully fine-tuned SFT model pass its folder as model_name_or_path instead"
        )
    return config


def adapter_digest(adapter: str | Path) -> str:
    """SHA-256 of an adapter's weight file(s): identifies an SFT adapter wherever it was copied to."""
    digest = hashlib.sha256()
    hooked = hooked_adapter_type(adapter)
    files = [Path(adapter) / hooked.weights_file] if hooked else sorted(Path(adapter).glob("adapter_model.*"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise UserError(f"adapter folder {adapter} has no adapter_model weights")
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


# the saved folder


def write_metadata(
    folder: Path, *, base: str, base_path: str, sft_adapter: str | None, max_length: int, hidden_size: int,
    **extra,
):
    """Write ``reward_model.json``: what a loader needs to rebuild the exact scoring model (+ ``extra`` keys)."""
    meta = {
        "format": FORMAT,
        "version": 1,
        "base_model": base,
        "base_model_path": base_path,
        "sft_adapter": SFT_COPY if sft_adapter else None,
        "sft_adapter_source": str(Path(sft_adapter).resolve()) if sft_adapter else None,
        "sft_adapter_sha256": adapter_digest(sft_adapter) if sft_adapter else None,
        "sft_merged": bool(sft_adapter) and hooked_adapter_type(sft_adapter) is None,
        "sft_method": _adapter_method(sft_adapter) if sft_adapter else None,
        "max_length": max_length,
        "hidden_size": hidden_size,
        "input": INPUT_FORMAT,
        "pooling": pooling_description(extra.get("pool", "last")),
        **extra,
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _adapter_method(adapter: str) -> str:
    hooked = hooked_adapter_type(adapter)
    return hooked.method if hooked is not None else "lora"


def read_metadata(folder: str | Path) -> dict:
    """``reward_model.json`` of a reward-model folder (UserError naming what is missing).

    A LoRA reward model (``method`` absent or ``lora``) needs ``adapter_config.json``, a LoReFT one its
    intervention and head files (:func:`check_reft_files`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"reward model folder not found: {folder}")
    meta_file = folder / METADATA_FILE
    try:
        loreft = meta_file.is_file() and is_reft_reward(json.loads(meta_file.read_text()))
    except (OSError, ValueError, AttributeError):  # unreadable: reported below as for any reward model
        loreft = False
    if loreft:
        check_reft_files(folder)
    elif not meta_file.is_file() or not (folder / "adapter_config.json").is_file():
        missing = " and ".join(n for n in (METADATA_FILE, "adapter_config.json") if not (folder / n).is_file())
        raise UserError(f"{folder} is not a reward model written by `rlhf reward` (it has no {missing})")
    else:
        read_adapter_config(folder)
    meta = read_json(meta_file, "reward model description")
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not a {FORMAT} description")
    for key, kind in (("base_model", str), ("base_model_path", str), ("max_length", int)):
        if not isinstance(meta.get(key), kind):
            raise UserError(f"{meta_file}: '{key}' is missing or not a {kind.__name__}")
    return meta


def is_reft_reward(meta: dict) -> bool:
    """Whether a ``reward_model.json`` describes a LoReFT reward model (:mod:`reward.reft`)."""
    return meta.get("method", "lora") == "loreft"


def check_reft_files(folder: Path) -> None:
    """The files of a LoReFT reward-model folder; its interventions' config and weights checked as for SFT."""
    from rlhf.reft import LoReFT

    for name in (LoReFT.config_file, LoReFT.weights_file, REFT_HEAD_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder} is a LoReFT reward model without {name}")
    check_adapter(str(folder), hooked=True)


def read_stats(folder: str | Path) -> dict:
    path = Path(folder) / STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"mean": 0.0, "std": 1.0, "n": 0}


def write_ensemble(folder: Path, members: list[dict], **extra) -> dict:
    """Write ``ensemble.json``: member ``i``'s adapter (LoRA + score head) lives in ``members/i``.

    ``members``: one dict per member (``seed``, ``train_pairs``, ``calibration``, ...), in member
    order. A member's score is its raw score standardised with its ``calibration``
    (``(raw - mean) / std`` over training responses): Bradley-Terry training fixes neither offset nor
    scale, so raw members are not comparable and their min or std would measure offsets. The
    top-level adapter files are a copy of member 0, so readers that know no ensembles score with it
    (raw).
    """
    desc = {
        "format": ENSEMBLE_FORMAT,
        "version": 1,
        "size": len(members),
        "members": [{"path": f"{MEMBERS_DIR}/{i}", **m} for i, m in enumerate(members)],
        "score": "mean over members (RewardScorer.score); per member: RewardScorer.score_members",
        "member_score": "(raw score - calibration.mean) / calibration.std",
        "top_level_adapter": f"{MEMBERS_DIR}/0",
        **extra,
    }
    (folder / ENSEMBLE_FILE).write_text(json.dumps(desc, indent=2) + "\n")
    return desc


def ensemble_description(folder: str | Path) -> dict | None:
    """``ensemble.json`` of a reward-model folder, or None for a single reward model."""
    desc_file = Path(folder) / ENSEMBLE_FILE
    if not desc_file.is_file():
        return None
    desc = json.loads(desc_file.read_text())
    if desc.get("format") != ENSEMBLE_FORMAT or not desc.get("members"):
        raise UserError(f"{desc_file} is not a {ENSEMBLE_FORMAT} description")
    return desc


def member_dirs(folder: str | Path) -> list[Path]:
    """Adapter folders of the reward model's members: ``[folder]`` unless ``ensemble.json`` lists members."""
    folder = Path(folder)
    desc = ensemble_description(folder)
    if desc is None:
        return [folder]
    dirs = [folder / m["path"] for m in desc["members"]]
    for d in dirs:
        if not (d / "adapter_config.json").is_file():
            raise UserError(f"ensemble member folder {d} has no adapter_config.json")
    return dirs


def member_calibrations(folder: str | Path) -> list[dict | None]:
    """Each member's ``{"mean", "std"}`` (its raw scores on training responses; None = use raw scores)."""
    desc = ensemble_description(folder)
    return [None] if desc is None else [m.get("calibration") for m in desc["members"]]


def save_length_head(folder: Path, head: nn.Linear) -> None:
    """``length_head.safetensors``: the length head of a length-debiased RM (kept for inspection, unused in scoring)."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.detach().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu().contiguous()
    save_file(tensors, str(folder / LENGTH_HEAD_FILE))
