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
* :class:`OLoRA` is O-LoRA (Wang et al., 2023): each task trains a new LoRA adapter whose input
  subspace (the row space of its ``lora_A``) is kept orthogonal to the earlier tasks', which it keeps
  as state; the orthogonality term is normalised to [0, 1] (so λ₁ keeps its meaning across ranks,
  widths and models) unless asked for the paper's raw form.

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

import logging
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from .._params import canonical_name, state_dtype, unwrap_model
from .._sharding import full, is_sharded, local, reshard_all, shard_like, shard_mesh, sum_over_mesh
from .._store import TensorStore
from ..functional.olora import (
    check_normalize,
    column_weights,
    current_form,
    layer_overlap,
    layer_overlap_grad,
    past_form,
)
from ..regularizers import Compose, Regularizer
from ..regularizers.base import Hyperparameter, check_finite
from ..spec import TaskSpec

log = logging.getLogger("clreg")

__all__ = ["STATE_FILE", "OLoRA", "adapter_params", "load_with_adapter", "save_with_adapter"]

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


# -- O-LoRA ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Adapter:
    """The current adapter of a model, resolved: its name, its A per layer (in the regularizer's layer
    order, as given: a ``DTensor`` under FSDP2), every parameter of its ``lora_A`` / ``lora_B`` (θ_t,
    the L2 term's) with names, where each layer's A stands in that list, and the mesh they are sharded
    over (``None`` without FSDP2)."""

    name: str
    down: list[Tensor]
    params: list[Tensor]
    names: list[str]
    down_at: list[int]
    mesh: Any


def _lora_modules(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """The model's PEFT LoRA layers with their canonical paths (wrappers looked through)."""
    inner = unwrap_model(model)
    return [(canonical_name(n), m) for n, m in inner.named_modules() if isinstance(m, LoraLayer)]


def _parts(module: LoraLayer, adapter: str) -> list[tuple[str, nn.Module | nn.ParameterDict]]:
    """(attribute, container) of ``adapter`` in a LoRA layer: ``lora_A``/``lora_B`` (linear,
    convolution) or ``lora_embedding_A``/``lora_embedding_B``; the down-projection first."""
    if adapter in module.lora_A:
        return [("lora_A", module.lora_A), ("lora_B", module.lora_B)]
    if adapter in getattr(module, "lora_embedding_A", {}):
        return [("lora_embedding_A", module.lora_embedding_A), ("lora_embedding_B", module.lora_embedding_B)]
    return []


def _down(module: LoraLayer, adapter: str) -> tuple[str, Tensor] | None:
    """(name within the layer, A) of ``adapter``'s down-projection at ``module``, or None."""
    parts = _parts(module, adapter)
    if not parts:
        return None
    attr, container = parts[0]
    if attr == "lora_A":
        return f"lora_A.{adapter}.weight", container[adapter].weight
    return f"lora_embedding_A.{adapter}", container[adapter]


def _adapter_params(path: str, module: LoraLayer, adapter: str) -> list[tuple[str, Tensor]]:
    """``adapter``'s parameters at ``module`` with their names, the down-projection's first."""
    found = []
    for attr, container in _parts(module, adapter):
        item = container[adapter]
        if isinstance(item, nn.Module):
            found += [(f"{path}.{attr}.{adapter}.{n}", p) for n, p in item.named_parameters()]
        else:
            found.append((f"{path}.{attr}.{adapter}", item))
    return found


def _adapters(modules: list[tuple[str, LoraLayer]]) -> list[str]:
    names = {a for _, m in modules for a in (*m.lora_A.keys(), *getattr(m, "lora_embedding_A", {}).keys())}
    return sorted(names)


def _trainable_adapter(modules: list[tuple[str, LoraLayer]]) -> str:
    """The one adapter whose down-projections train; a ValueError when none or several do."""
    training = [a for a in _adapters(modules) if any((d := _down(m, a)) and d[1].requires_grad for _, m in modules)]
    if len(training) == 1:
        return training[0]
    if not training:
        raise ValueError(
            f"no LoRA adapter of this model trains (adapters {_adapters(modules)}, every lora_A frozen): "
            "O-LoRA penalises the current task's adapter; make it trainable or name it with adapter=..."
        )
    raise ValueError(
        f"several LoRA adapters train ({training}): O-LoRA penalises one, the current task's; freeze the "
        "earlier ones (PeftModel.set_requires_grad(name, False)) or name the current one with adapter=..."
    )


class _Rows(TensorStore):
    """A growable store whose tensors gain several rows at once (one task's A: r rows)."""

    def extend(self, tensors: list[Tensor]) -> None:
        for key, t in zip(self._keys, tensors, strict=True):
            old = self._buffers[key]
            self._buffers[key] = torch.cat([old, t.detach().to(device=old.device, dtype=old.dtype)])
        self._refresh()


def _check_loaded(module: OLoRA, incompatible_keys: Any) -> None:
    """``load_state_dict``'s post-hook (a module-level function, so the module pickles)."""
    module._check_loaded()


class OLoRA(Regularizer):
    r"""O-LoRA (Wang, Chen, Ge, Xia, Bao, Zheng, Zhang, Gui & Huang, Findings of EMNLP 2023,
    *Orthogonal Subspace Learning for Language Model Continual Learning*) over a PEFT LoRA model.

    Each task t trains its own LoRA adapter; the earlier tasks' adapters stay in the model, frozen (or
    merged into the base weights). The penalty keeps the current adapter's input subspace (the row
    space of its down-projection :math:`A_t`, PEFT's ``lora_A``) orthogonal to the earlier ones, and
    optionally shrinks the current adapter:

    .. math:: P = \lambda_1\, O(A_t; A_1, \dots, A_{t-1}) + \lambda_2 \lVert \theta_t \rVert_2^2

    with O from :func:`clreg.functional.olora.orthogonality` over every adapted layer ℓ = 1 … L:

    * ``normalize="subspace"`` (the default): the mean over layers and earlier tasks of the mean
      squared cosine of the principal angles between :math:`A_t`'s and :math:`A_s`'s row spaces,
      :math:`O = \frac{1}{L} \sum_\ell \frac{1}{t-1} \sum_{s<t} \lVert Q_{t,\ell} Q_{s,\ell}^\top
      \rVert_F^2 / \min(r_t, k_s)` with Q orthonormal bases of the row spaces (:math:`k_s \le r_s`
      the dimension of :math:`A_s`'s): in [0, 1], 0 when every subspace is orthogonal to every earlier
      one, 1 when each lies in (or contains) every earlier one;
    * ``"cosine"``: the same means of the mean over row pairs of the squared cosine between rows (in
      [0, 1], cheaper, basis-dependent);
    * ``None``: the paper's :math:`\sum_\ell \sum_{s<t} \lVert A_{t,\ell} A_{s,\ell}^\top \rVert_F^2`.

    θ_t is every parameter of the current adapter's ``lora_A`` and ``lora_B`` (a sum of squares, no ½);
    the L2 term acts in every task, the first included, so with λ₂ > 0 the value before the first
    consolidation is not zero.

    **Why normalise.** The paper's sum has no scale of its own: it grows with the square of each A's
    scale (the fourth power when every A grows alike), with :math:`r_t r_s`, and with the numbers of
    layers and of earlier tasks. At PEFT's initialisation of ``lora_A`` (uniform in :math:`\pm
    1/\sqrt{d}`, d the input width) its expectation is :math:`r_t r_s / (9 d)` per layer and earlier
    task; after that its size depends on how far training has moved the A's, so a λ₁ tuned on one
    model, rank or run says little about another. The normalised form is a mean of squared cosines
    and does not move with A's scale, the ranks, the width, the number of layers or of tasks: λ₁ = 1
    means that subspaces that fully overlap the earlier ones cost as much as one unit of the task loss
    (one nat of a cross-entropy), orthogonal ones nothing. Two random subspaces of dimensions a and b
    in :math:`\mathbb{R}^d` give max(a, b)/d in expectation (chance level). Being scale-invariant,
    the normalised forms have a gradient orthogonal to A (they turn A, never shrink it) of size
    :math:`\propto 1/\lVert A \rVert`: an adapter whose A starts at zero (PEFT's embedding LoRA) gets
    large turning steps until A has grown; use ``normalize=None`` or a small λ₁ there.

    The layers are the model's PEFT ``LoraLayer`` modules that hold the current adapter (``lora_A``, or
    ``lora_embedding_A`` for an embedding; a convolution's A flattened to r × in·k_h·k_w). They are
    fixed when the regularizer is built: a later adapter on another set of layers, or on a layer of
    another input width, is a ValueError naming the layer. The rank may change between tasks and
    between layers (PEFT's ``rank_pattern``): :math:`A_t A_s^\top` is :math:`r_t \times r_s`, the
    normalised forms divide by what full overlap gives at those ranks, and the state records each
    task's rank at each layer. When the earlier tasks' subspaces of a layer leave fewer free input
    dimensions than the current rank, no adapter can be orthogonal to them all: the first value with
    that rank warns.

    The current adapter is ``adapter`` if given, else the one adapter whose ``lora_A`` trains (a
    ValueError when none or several do); it is looked up again when the model, its adapters (names or
    configurations), or the trainability of the adapter found change.

    Args:
        model: a PEFT model with LoRA layers (``peft.get_peft_model(base, LoraConfig(...))``), or that
            model under DDP or ``torch.compile``.
        lam1: λ₁ ≥ 0, the weight of the orthogonality term.
        lam2: λ₂ ≥ 0, the weight of the L2 term on the current adapter (0 by default: off).
        normalize: ``"subspace"`` (default), ``"cosine"`` or ``None`` (the paper's raw form).
        eps: ε > 0, the relative ridge of the subspace form's Cholesky factor.
        adapter: the current task's adapter by name; ``None`` (default) for the one that trains.

    State: ``past`` (per layer, the earlier tasks' A stacked along rows, Σ r_s × d_in, kept whole on
    every rank in the wider of float32 and the adapter's dtype) and ``ranks`` (n_tasks × layers, each
    task's rank at each layer); the saved record holds the layers, their widths and the
    hyperparameters (not θ_t's names, which change with each task's adapter). ``consolidate(model)``
    appends the current adapter's A at every layer (no data is needed).

    Two modes. Autograd (the default): the value is differentiable, through a few r × d products and
    one r × r Cholesky factor per group of layers of equal shapes. Attached (``reg.attach(optimizer)``):
    a step pre-hook adds the closed-form gradient λ₁ ∇O + 2λ₂ θ_t
    (:func:`clreg.functional.olora.layer_overlap_grad`) to the current adapter's ``.grad``, after DDP's
    all-reduce and GradScaler's unscale, after any clipping you do, once per optimizer step; it is
    recorded in the ledger for SI (the autograd mode's is not, as LwF's is not). Attach each task's
    optimizer (``detach()`` the previous one): a step whose optimizer holds none of the current
    adapter's parameters is a ValueError.

    Distributed. Under DDP every rank holds the same adapters, so ``consolidate`` stores the same A's
    and the state is identical on every rank without communication; each rank's penalty gradient is
    the same, and DDP's average of it is it. Under FSDP2 the A's are gathered whole (small: r × d per
    layer) for the orthogonality term and at ``consolidate``, every rank keeps the whole state, the L2
    term sums local shards with one all-reduce, and each rank's gradient lands on its own shards.
    """

    hyperparameters = ("lam1", "lam2", "normalize", "eps")
    attachable = True

    def __init__(
        self,
        model: nn.Module,
        lam1: float = 1.0,
        lam2: float = 0.0,
        *,
        normalize: str | None = "subspace",
        eps: float = 1e-6,
        adapter: str | None = None,
    ) -> None:
        modules = _lora_modules(model)
        if not modules:
            raise TypeError(
                f"O-LoRA needs a model with PEFT LoRA layers (peft.get_peft_model(base, peft.LoraConfig(...))), "
                f"got a {type(model).__name__} without any"
            )
        self._adapter = self._check_adapter(adapter)
        name = adapter if adapter is not None else _trainable_adapter(modules)
        held = [(path, m) for path, m in modules if _down(m, name) is not None]
        if not held:
            raise ValueError(f"no LoRA adapter named {name!r}; the model has {_adapters(modules)}")
        chosen = {n for path, m in held for n, _ in _adapter_params(path, m, name)}
        super().__init__(model, params=lambda n, p: n in chosen)
        self.lam1, self.lam2, self.normalize, self.eps = lam1, lam2, normalize, eps
        self.layers = [path for path, _ in held]
        downs = [_down(m, name)[1] for _, m in held]  # type: ignore[index]
        self.widths = [int(d[0].numel()) for d in downs]
        dtype, device = state_dtype(downs[0].dtype), downs[0].device
        self.add_module(
            "past",
            _Rows(self.layers, [torch.zeros(0, w, dtype=dtype, device=device) for w in self.widths], growable=True),
        )
        self.add_module(
            "ranks",
            _Rows(["ranks"], [torch.zeros(0, len(self.layers), dtype=torch.int64, device=device)], growable=True),
        )
        self._found: tuple[Any, ...] | None = None
        self._groups: dict[tuple[int, ...], list[tuple[list[int], Tensor, Tensor]]] = {}
        self._recording = self.ledger.switch()
        self.register_load_state_dict_post_hook(_check_loaded)
        self._current(model)

    lam1 = Hyperparameter(doc="λ₁ ≥ 0, the weight of the orthogonality term.")
    lam2 = Hyperparameter(doc="λ₂ ≥ 0, the weight of the L2 term on the current adapter.")
    eps = Hyperparameter(low_open=True, doc="ε > 0, the relative ridge of the subspace form.")

    @property
    def normalize(self) -> str | None:
        """``"subspace"``, ``"cosine"`` or ``None``: the form of the orthogonality term."""
        return self._normalize

    @normalize.setter
    def normalize(self, value: str | None) -> None:
        self._normalize = check_normalize(value)
        self._state_changed()

    @staticmethod
    def _check_adapter(adapter: Any) -> str | None:
        if adapter is not None and not isinstance(adapter, str):
            raise TypeError(f"adapter must be an adapter's name (a str) or None, got {type(adapter).__name__}")
        return adapter

    @property
    def adapter(self) -> str | None:
        """The current task's adapter by name, or ``None`` for the one that trains."""
        return self._adapter

    @adapter.setter
    def adapter(self, value: str | None) -> None:
        self._adapter = self._check_adapter(value)
        self._found = None if self._found is None else (self._found[0], None, None)

    @property
    def param_names(self) -> list[str]:
        """The names of the current adapter's parameters (θ_t), as last resolved."""
        if self._found is not None and self._found[2] is not None:
            return list(self._found[2].names)
        return super().param_names

    # -- the current adapter ----------------------------------------------------------------------
    def _fingerprint(self, inner: nn.Module) -> tuple[Any, ...]:
        """The model's class, its adapters' configs (the objects themselves: held, so that a config
        made for an adapter replaced under the same name can never pass for the old one, as its
        ``id`` could) and the adapter asked for."""
        configs = getattr(inner, "peft_config", None) or {}
        return (type(inner), tuple(configs.items()), self._adapter)

    @staticmethod
    def _same_fingerprint(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        return (
            a[0] is b[0]
            and a[2] == b[2]
            and len(a[1]) == len(b[1])
            and all(ka == kb and va is vb for (ka, va), (kb, vb) in zip(a[1], b[1], strict=True))
        )

    def _current(self, model: nn.Module) -> _Adapter:
        """The current adapter of ``model``, cached while the model, its adapters and the found
        adapter's trainability stay as they were."""
        inner = unwrap_model(model)
        found = self._found
        if (
            found is not None
            and found[2] is not None
            and found[0]() is inner
            and self._same_fingerprint(found[1], self._fingerprint(inner))
            and (self._adapter is not None or all(a.requires_grad for a in found[2].down))
        ):
            return found[2]
        current = self._resolve_adapter(inner)
        self._found = (weakref.ref(inner), self._fingerprint(inner), current)
        return current

    def _last_model(self) -> nn.Module:
        """The model last seen (weakly held), for the attached mode's hook."""
        model = self._found[0]() if self._found is not None else None
        if model is None:
            raise ValueError("the model this O-LoRA last saw is gone: call reg(model) on the trained model first")
        return model

    def _resolve_adapter(self, inner: nn.Module) -> _Adapter:
        reshard_all(inner)  # FSDP2: the sharded parameters (the root keeps its own whole after a forward)
        modules = _lora_modules(inner)
        if not modules:
            raise TypeError(f"O-LoRA needs a model with PEFT LoRA layers, got a {type(inner).__name__} without any")
        name = self._adapter if self._adapter is not None else _trainable_adapter(modules)
        by_path = {path: m for path, m in modules if _down(m, name) is not None}
        self._check_layers(name, by_path, _adapters(modules))
        down, params, names, down_at = [], [], [], []
        for path, width in zip(self.layers, self.widths):
            module = by_path[path]
            attr, a = _down(module, name)  # type: ignore[misc]
            if a[0].numel() != width:
                raise ValueError(
                    f"parameter {path + '.' + attr!r} has shape {tuple(a.shape)}: input width {a[0].numel()}, but "
                    f"layer {path!r} had width {width} when this O-LoRA was built (a different model?)"
                )
            down.append(a)
            down_at.append(len(params))
            for n, p in _adapter_params(path, module, name):
                names.append(n)
                params.append(p)
        return _Adapter(name, down, params, names, down_at, shard_mesh(params, names))

    def _check_layers(self, name: str, by_path: dict[str, LoraLayer], adapters: list[str]) -> None:
        if not by_path:
            raise ValueError(f"no LoRA adapter named {name!r}; the model has {adapters}")
        missing = [p for p in self.layers if p not in by_path]
        if missing:
            raise ValueError(
                f"layer {missing[0]!r} has no LoRA adapter {name!r}: O-LoRA needs the same adapted layers in "
                f"every task ({len(self.layers)} layers when it was built, e.g. {self.layers[0]!r})"
            )
        extra = [p for p in by_path if p not in set(self.layers)]
        if extra:
            raise ValueError(
                f"layer {extra[0]!r} is adapted by {name!r} but was not when this O-LoRA was built: O-LoRA needs "
                "the same adapted layers in every task"
            )

    # -- value ------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """The penalty at the current adapter of ``model`` (``inputs``/``outputs`` are not used):
        differentiable in the autograd mode, the value alone when attached."""
        current = self._current(model)
        dtype = self.past.tensors[0].dtype
        value = self._zero().to(dtype)
        with (
            torch.autocast(value.device.type, enabled=False),
            torch.set_grad_enabled(torch.is_grad_enabled() and not self.attached),
        ):
            if self._n_tasks_py > 0 and self._lam1 != 0.0:
                value = value + self._lam1 * self._orthogonality(current)
            if self._lam2 != 0.0:
                squares = torch.stack([local(p).to(dtype).square().sum() for p in current.params]).sum()
                value = value + self._lam2 * sum_over_mesh(squares, current.mesh)
        self.last_value = value.detach()
        return value

    def _downs(self, current: _Adapter) -> list[Tensor]:
        """Each layer's current A, whole (gathered under FSDP2), as r × d in the state dtype."""
        dtype = self.past.tensors[0].dtype
        return [full(a).reshape(a.shape[0], -1).to(dtype) for a in current.down]

    def _scale(self) -> float:
        """1 for the raw sum over layers, 1/L for the normalised forms' mean over layers."""
        return 1.0 if self._normalize is None else 1.0 / len(self.layers)

    def _orthogonality(self, current: _Adapter) -> Tensor:
        downs = self._downs(current)
        parts = [
            layer_overlap(current_form(torch.stack([downs[i] for i in idx]), self._normalize, self._eps), past, w).sum()
            for idx, past, w in self._grouped(tuple(a.shape[0] for a in downs))
        ]
        return torch.stack(parts).sum() * self._scale()

    def _orthogonality_grad(self, current: _Adapter) -> list[Tensor]:
        """∂O/∂A_t per layer, whole and shaped as A, in closed form."""
        downs = self._downs(current)
        grads: list[Tensor] = [torch.empty(0)] * len(downs)
        for idx, past, w in self._grouped(tuple(a.shape[0] for a in downs)):
            _, g = layer_overlap_grad(torch.stack([downs[i] for i in idx]), past, w, self._normalize, self._eps)
            for i, gi in zip(idx, g * self._scale()):
                grads[i] = gi.reshape(current.down[i].shape)
        return grads

    def _grouped(self, ranks: tuple[int, ...]) -> list[tuple[list[int], Tensor, Tensor]]:
        """Layers grouped by (current rank, width, earlier forms' sizes), with the earlier forms stacked
        (group × Σ k_s × d) and the column weights: built once per state and set of current ranks."""
        if ranks not in self._groups:
            self._warn_if_full(ranks)
            by_key: dict[tuple[Any, ...], list[tuple[int, Tensor, list[int]]]] = {}
            per_task = self.ranks.tensors[0].tolist()
            for layer, (rows, r_t) in enumerate(zip(self.past.tensors, ranks)):
                forms = [past_form(a, self._normalize) for a in rows.split([t[layer] for t in per_task])]
                dims = [f.shape[0] for f in forms]
                by_key.setdefault((r_t, rows.shape[1], tuple(dims)), []).append((layer, torch.cat(forms), dims))
            groups = []
            for (r_t, _, dims), members in by_key.items():
                past = torch.stack([f for _, f, _ in members])
                weights = column_weights(r_t, list(dims), self._normalize, dtype=past.dtype, device=past.device)
                groups.append(([i for i, _, _ in members], past, weights))
            self._groups[ranks] = groups
        return self._groups[ranks]

    # -- the end of a task ------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """Keep the current adapter's A at every layer (``data`` and ``spec`` are not used). Start the
        next task on a new adapter (or re-initialised A and B): the same A again would overlap itself."""
        current = self._current(model)
        downs = [full(a).detach().reshape(a.shape[0], -1) for a in current.down]
        check_finite("O-LoRA's A", {f"{p}.{current.name}": a for p, a in zip(self.layers, downs)})
        self.past.extend(downs)
        self.ranks.extend([torch.tensor([[a.shape[0] for a in downs]], dtype=torch.int64)])
        self._bump_tasks()
        self._state_changed()
        log.info("OLoRA: task %d consolidated, adapter %r at %d layers", self._n_tasks_py, current.name, len(downs))

    def _warn_if_full(self, ranks: tuple[int, ...]) -> None:
        """Warn where the stored subspaces leave a layer fewer free input dimensions than its current rank."""
        for path, rows, r in zip(self.layers, self.past.tensors, ranks):
            used = int(torch.linalg.matrix_rank(rows)) if rows.shape[0] else 0
            if used + r > rows.shape[1]:
                warnings.warn(
                    f"O-LoRA: the earlier tasks' subspaces span {used} of the {rows.shape[1]} input dimensions of "
                    f"layer {path!r}: the current adapter (rank {r}) cannot be orthogonal to them all, and the "
                    "orthogonality term's minimum is above 0",
                    stacklevel=4,
                )
                return

    # -- attached mode ----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> OLoRA:
        """Add λ₁ ∇O + 2λ₂ θ_t to the current adapter's ``.grad`` on each ``optimizer.step()`` (``scaler``
        is not needed: the pre-hook runs after GradScaler's unscale); with ``hook=False``, when
        :meth:`pre_step` is called. The adapter is the one of the model last seen (built on, or last
        given to ``reg(model)``)."""
        if self.attached:
            raise ValueError("OLoRA is already attached; call detach() first")
        self._optimizer_mask(optimizer, self._current(self._last_model()).params)  # the checks
        held = frozenset(id(p) for group in optimizer.param_groups for p in group["params"])
        self._step_mask = held  # the optimizer's parameters: the adapter is looked up on each step
        if hook:
            self._handles.append(optimizer.register_step_pre_hook(lambda opt, args, kw: self._pre_step(held)))
        self._attached = True
        return self

    def _pre_step(self, mask: frozenset[int]) -> None:  # type: ignore[override]
        current = self._current(self._last_model())
        if not any(id(p) in mask for p in current.params):
            raise ValueError(
                f"the optimizer OLoRA is attached to holds none of adapter {current.name!r}'s parameters: "
                "detach() and attach(optimizer) with the current task's optimizer"
            )
        added = self._gradient(current)
        chosen = [
            i for i, p in enumerate(current.params) if id(p) in mask and p.grad is not None and added[i] is not None
        ]
        if not chosen:
            return
        params, extra = [current.params[i] for i in chosen], [added[i] for i in chosen]
        grads = [local(p.grad) for p in params]
        torch._foreach_add_(grads, [e.to(g.dtype) for e, g in zip(extra, grads)])
        if self._recording(current.params):
            self.ledger.record_unscaled(params, extra)

    def _gradient(self, current: _Adapter) -> list[Tensor | None]:
        """λ₁ ∂O/∂θ + 2λ₂ θ per parameter of θ_t (local shards, state dtype); ``None`` where it is 0."""
        dtype = self.past.tensors[0].dtype
        added: list[Tensor | None] = [None] * len(current.params)
        if self._lam2 != 0.0:
            added = [local(p).detach().to(dtype) * (2 * self._lam2) for p in current.params]
        if self._n_tasks_py > 0 and self._lam1 != 0.0:
            for at, a, g in zip(current.down_at, current.down, self._orthogonality_grad(current)):
                g = local(shard_like(g, a)) if is_sharded(a) else g
                prev = added[at]
                added[at] = self._lam1 * g if prev is None else prev.add_(g, alpha=self._lam1)
        return added

    # -- caches and state -------------------------------------------------------------------------
    def _ledger_changed(self, old: Any) -> None:
        self._recording = self.ledger.switch()

    def _state_changed(self) -> None:
        self._groups = {}

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._state_changed()
        return out

    def _cache_tensors(self) -> list[Tensor]:
        return [t for groups in self._groups.values() for _, past, w in groups for t in (past, w)]

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        del state["params"], state["shapes"]  # θ_t changes with each task's adapter: the layers stand for it
        return {**state, "layers": list(self.layers), "widths": list(self.widths)}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("type") == type(self).__name__:
            saved = list(zip(state.get("layers", []), state.get("widths", [])))
            ours = list(zip(self.layers, self.widths))
            if saved != ours:
                diff = next(((s, o) for s, o in zip(saved, ours) if s != o), None)
                where = (
                    f"layer {diff[0][0]!r} of width {diff[0][1]}, this O-LoRA has layer {diff[1][0]!r} of width "
                    f"{diff[1][1]}"
                    if diff
                    else f"{len(saved)} layers, this O-LoRA has {len(ours)}"
                )
                raise ValueError(f"state was saved for {where}")
            state = {**state, "params": list(self._pset.names), "shapes": [list(s) for s in self._pset.shapes]}
        super().set_extra_state(state)

    def _check_loaded(self) -> None:
        """After a load: the ranks and the stored rows agree (one row of ranks per task, and at each layer
        the ranks sum to the rows stored)."""
        ranks = self.ranks.tensors[0]
        if ranks.shape != (self._n_tasks_py, len(self.layers)) or bool((ranks < 1).any()):
            raise ValueError(
                f"state has ranks of shape {tuple(ranks.shape)} (min {ranks.min().item() if ranks.numel() else None}) "
                f"for {self._n_tasks_py} tasks and {len(self.layers)} layers: expected a positive rank per task "
                "and layer"
            )
        for path, rows, total in zip(self.layers, self.past.tensors, ranks.sum(0).tolist()):
            if rows.shape[0] != total:
                raise ValueError(f"state holds {rows.shape[0]} rows of A at layer {path!r}, its ranks sum to {total}")
        self._state_changed()
