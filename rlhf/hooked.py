"""Hooked module adapters: small trainable modules hooked onto a frozen base model.

Some fine-tuning methods change no weight of the base. Each adds a few "edit" modules e: h -> h' and a
forward hook per site, a sub-module of the base (a transformer block, its attention or its MLP), that
rewrites what the site returns, at every position (so generation sees the same edit as training):

    output -> e(output)          (the first element when the site returns a tuple)

LoReFT (:mod:`rlhf.reft`) edits block outputs, bottleneck adapters (:mod:`rlhf.bottleneck`) the
attention and MLP outputs. Both are a :class:`HookedAdapter`: an ``nn.ModuleDict`` {site key: edit}
that lives on the model as ``model.<attribute>`` (so optimisers and ``named_parameters`` see it; every
base parameter is frozen when it is attached), saved as ``<config_file>`` (JSON: the method, its
options, the base it adapts) + ``<weights_file>`` (safetensors: its state dict only).
``rlhf.models.load_model(base, adapter=folder)`` re-attaches a saved folder via :meth:`HookedAdapter.load`.

Such an adapter is not a PEFT adapter: it cannot be merged into the weights, interpolated, or stacked
under a PEFT policy (DPO, a reward backbone). PPO trains a LoReFT policy directly: the hooks read their
edit through :meth:`HookedAdapter.edit_for`, so one set of hooks runs the policy's edits, the frozen
reference's (:meth:`HookedAdapter.swapped`) or none.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from torch import nn

from rlhf.errors import UserError

# helper functions


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """Name and module of the transformer blocks: the longest ``nn.ModuleList`` in the model."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError("the model has no list of transformer blocks")
    return max(lists, key=lambda item: len(item[1]))


def _edit_output(adapter: HookedAdapter, key: str):
    def hook(module, args, output):
        edit = adapter.edit_for(key)
        if edit is None:
            return output
        if isinstance(output, tuple):
            return (edit(output[0]),) + tuple(output[1:])
        return edit(output)

    return hook


def attached_adapter(model: nn.Module) -> HookedAdapter | None:
    """The hooked adapter attached to ``model`` (None when there is none)."""
    return next((m for m in model.children() if isinstance(m, HookedAdapter)), None)


# the adapter


class HookedAdapter(nn.ModuleDict):
    """{site key: edit module}, hooked on the sites :meth:`sites` names. Subclasses set the class
    attributes and implement :meth:`from_settings` and :meth:`sites`."""

    method: ClassVar[str]  # the `rlhf sft --method` that trains it
    config_file: ClassVar[str]
    weights_file: ClassVar[str]
    attribute: ClassVar[str]  # model.<attribute> holds it
    type_key: ClassVar[str]  # config_file records the method under this key
    full_precision: ClassVar[bool] = False  # keep the edits in fp32 on a half-precision model

    def __init__(self, settings: dict, edits: dict[str, nn.Module]):
        super().__init__(edits)
        self.settings = dict(settings)  # what config_file records besides the method and the base
        self.base_model_name_or_path: str | None = None
        self._handles: list = []
        self._swap: tuple = ()  # (edits,) while swapped(edits) runs; edits None = no edit

    @classmethod
    def from_settings(cls, model: nn.Module, settings: dict) -> HookedAdapter:
        """A freshly initialised, unattached adapter for ``model`` from options (or a saved config)."""
        raise NotImplementedError

    def sites(self, model: nn.Module) -> dict[str, nn.Module]:
        """{key: the sub-module of ``model`` whose output ``self[key]`` edits}."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> HookedAdapter:
        """Freeze ``model``, move the edits to its device and dtype (fp32 if ``full_precision``), hook them on and
        keep self on the model."""
        present = attached_adapter(model)
        if present is not None:
            raise UserError(f"the model already carries a {present.method} adapter")
        sites = self.sites(model)
        model.requires_grad_(False)
        param = next(model.parameters())
        half = param.dtype.is_floating_point and not self.full_precision
        self.to(device=param.device, dtype=param.dtype if half else None)
        for key, module in sites.items():
            self._handles.append(module.register_forward_hook(_edit_output(self, key)))
        setattr(model, self.attribute, self)
        self.base_model_name_or_path = getattr(model.config, "name_or_path", None)
        return self

    def edit_for(self, key: str) -> nn.Module | None:
        """The edit the hook on site ``key`` applies now (None: the site's output passes unchanged)."""
        if not self._swap:
            return self[key]
        edits = self._swap[0]
        return None if edits is None else edits[key]

    @contextmanager
    def swapped(self, edits: nn.ModuleDict | None):
        """Run the body with ``edits`` (same keys, e.g. a frozen copy) in place of this adapter's own;
        None: no edit at all (the bare base)."""
        if edits is not None and set(edits) != set(self):
            raise ValueError("swapped edits must have the adapter's site keys")
        saved, self._swap = self._swap, (edits,)
        try:
            yield
        finally:
            self._swap = saved

    def config(self) -> dict:
        return {self.type_key: self.method, **self.settings, "base_model_name_or_path": self.base_model_name_or_path}

    def save(self, folder: str | Path) -> None:
        """Write ``config_file`` + ``weights_file`` (the edits' state dict) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / self.weights_file))
        (folder / self.config_file).write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def load(cls, model: nn.Module, folder: str | Path) -> nn.Module:
        """Attach the adapter saved in ``folder`` to ``model`` (in place) and return the model."""
        from safetensors.torch import load_file

        folder = Path(folder)
        weights = folder / cls.weights_file
        if not weights.is_file():
            raise UserError(f"adapter folder {folder} has no {cls.weights_file}")
        settings = json.loads((folder / cls.config_file).read_text())
        try:
            adapter = cls.from_settings(model, settings)
        except (KeyError, TypeError, ValueError) as exc:
            file = folder / cls.config_file
            raise UserError(f"adapter config {file} is not a {cls.method} config: {exc!r}") from None
        except UserError as exc:
            raise UserError(f"cannot load adapter {folder}: {exc}") from None
        try:
            adapter.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            from rlhf.models import state_dict_error

            raise state_dict_error(folder, exc) from None
        adapter.attach(model)
        return model

