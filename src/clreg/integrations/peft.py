"""clreg over PEFT adapters (``pip install "clreg[peft]"``): the regularizers' state over the
adapter's parameters alone (LoRA's ``lora_A`` / ``lora_B``, or any PEFT tuner's), saved beside the
adapter.

* :func:`adapter_params` is the predicate that selects them: ``clreg.EWC(model, lam,
  params=adapter_params(model))`` (the same for OnlineEWC, SI, MAS and KFACEWC). A
  ``get_peft_model`` freezes the base model, and clreg selects only trainable parameters anyway, but
  the predicate also leaves out a trainable head in ``modules_to_save`` unless asked for, and names
  one adapter among several.
* LwF's teacher is the adapted model at the last consolidation: ``clreg.LwF(model,
  params=adapter_params(model), teacher_params="selected")`` copies the adapter's parameters only and
  runs them with the frozen base weights (a copy of every parameter otherwise).
* :func:`save_with_adapter` writes the adapter (``save_pretrained``) and the regularizer's state
  (``clreg.pt``, loadable with ``weights_only=True``) into one folder; :func:`load_with_adapter` reads
  the state back into a regularizer built on ``PeftModel.from_pretrained(base, folder,
  is_trainable=True)`` (trainable: clreg selects trainable parameters).

Example:
    >>> import torch, clreg, peft
    >>> base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    >>> ewc = clreg.EWC(model, lam=1.0, params=adapter_params(model))
    >>> sorted({name.split(".")[-2] for name in ewc.param_names})   # the adapter's name, "default"
    ['default']
    >>> all("lora_" in name for name in ewc.param_names), len(ewc.param_names)
    (True, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
from torch import Tensor, nn

from ..regularizers import Compose, Regularizer

__all__ = ["STATE_FILE", "adapter_params", "load_with_adapter", "save_with_adapter"]

STATE_FILE = "clreg.pt"


def _prefixes(model: nn.Module, adapter: str | None) -> tuple[str, ...]:
    """The name prefixes of the adapters' parameters (``lora_`` …), from each adapter's config."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise TypeError(f"adapter_params needs a PEFT model (peft.get_peft_model), got {type(model).__name__}")
    if adapter is not None and adapter not in configs:
        raise ValueError(f"no adapter named {adapter!r}; the model has {sorted(configs)}")
    chosen = [configs[adapter]] if adapter is not None else list(configs.values())
    return tuple({peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[c.peft_type] for c in chosen})


def adapter_params(
    model: nn.Module, adapter: str | None = None, *, modules_to_save: bool = False
) -> Callable[[str, Tensor], bool]:
    """A ``params`` predicate ``(name, param) -> bool`` selecting the parameters of ``adapter`` (all
    adapters by default) of a PEFT model, and with ``modules_to_save`` the trainable copies of the
    modules PEFT trains in full (``modules_to_save.<adapter>.…``)."""
    prefixes = _prefixes(model, adapter)
    names = [adapter] if adapter is not None else list(model.peft_config)

    def selected(name: str, param: Tensor) -> bool:
        parts = name.split(".")
        if not any(f".{n}." in f".{name}." for n in names):
            return False
        if any(p.startswith(prefixes) for p in parts):
            return True
        return modules_to_save and "modules_to_save" in parts

    return selected


def save_with_adapter(model: nn.Module, regularizer: Regularizer | Compose, directory: str | Path) -> Path:
    """The adapter (``model.save_pretrained(directory)``) and the regularizer's state in
    ``directory / "clreg.pt"``; returns the state's path."""
    directory = Path(directory)
    model.save_pretrained(str(directory))
    path = directory / STATE_FILE
    torch.save(regularizer.state_dict(), path)
    return path


def load_with_adapter(regularizer: Regularizer | Compose, directory: str | Path) -> Any:
    """Load ``directory / "clreg.pt"`` (``weights_only=True``) into ``regularizer``, built on the model
    with the adapter loaded from ``directory``."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no clreg state in {directory}: expected {path} (written by save_with_adapter)")
    return regularizer.load_state_dict(torch.load(path, weights_only=True))
