r"""EWC with Kronecker-factored curvature (Ritter, Botev & Barber 2018; K-FAC: Martens & Grosse 2015,
KFC for convolutions: Grosse & Martens 2016).

For each ``Linear`` and ungrouped ``Conv2d`` layer whose factors are at most ``max_factor`` rows, the
Fisher block of its augmented weight :math:`\tilde W = [W, b]` is :math:`A \otimes G`
(:func:`clreg.functional.fisher_curvature`); every other selected parameter keeps EWC's diagonal F:

.. math::

    P(\theta) = \frac{\lambda}{2} \Bigl[\sum_{\text{layers}} \mathrm{tr}\bigl(G\,\Delta\,A\,\Delta^\top\bigr)
                + \sum_{\text{other } i} F_i (\theta_i - \theta^*_i)^2\Bigr], \qquad \Delta = \tilde W - \tilde W^*,

with the closed-form gradient :math:`\lambda\, G \Delta A` (and :math:`\lambda F (\theta - \theta^*)`).
Over tasks, as Online EWC: a running sum with decay γ of each factor and of the diagonal,
:math:`A \leftarrow \gamma A + A_t`, :math:`G \leftarrow \gamma G + w_t G_t`,
:math:`F \leftarrow \gamma F + w_t F_t`, and one anchor θ*, the parameters at the last consolidation.
Summing the factors keeps the penalty O(in² + out²) per layer whatever the number of tasks; the
product of sums carries cross terms :math:`A_s \otimes G_t` (s ≠ t) that a sum of per-task products
would not. ``damping`` δ ≥ 0 (default 0: no inverse is needed) adds :math:`\sqrt\delta\,I` to both
factors in the penalty.

Under FSDP2 the anchor and the diagonal are sharded like the parameters; the factors A and G are
replicated on every rank (in² + out² numbers per layer, in the state dtype), and each evaluation
gathers one layer's Δ at a time (see :mod:`clreg.functional.kfac`).

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    >>> reg = clreg.KFACEWC(model, lam=1.0)
    >>> reg.consolidate(model, torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))))
    >>> reg.kfac_layers, reg(model).item()
    (['0', '2'], 0.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector
from .._sharding import local, local_all
from ..functional.curvature import CurvatureEngine
from ..functional.fisher import fisher_curvature
from ..functional.kfac import kfac_penalty, kfac_penalty_grad, kfac_penalty_value
from ..functional.penalty import quadratic_penalty, quadratic_penalty_grad, quadratic_penalty_value
from ..spec import TaskSpec
from .base import Hyperparameter, Regularizer, check_finite
from .ewc import FisherOptions

__all__ = ["KFACEWC"]


class KFACEWC(Regularizer):
    """EWC whose importance is Kronecker-factored for the layers that allow it.

    Args:
        model: the model to protect (DDP / compiled wrappers are looked through).
        lam: λ ≥ 0.
        gamma: γ ∈ [0, 1], the decay of the running factors (1: plain sums).
        damping: δ ≥ 0 added as √δ I to A and G in the penalty.
        max_factor: a layer whose A or G would exceed this many rows keeps the diagonal.
        estimator, mc_samples, max_samples, chunk_size, seed, progress: the Fisher's, as for :class:`EWC`
            (``batched`` has no factors).
        params: parameter names or a predicate.
    """

    attachable = True
    hyperparameters = ("lam", "gamma", "damping")

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1.0,
        *,
        gamma: float = 1.0,
        damping: float = 0.0,
        max_factor: int = 1024,
        estimator: str | None = None,
        mc_samples: int = 1,
        max_samples: int | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
        params: ParamSelector = None,
        progress: Any = None,
    ) -> None:
        super().__init__(model, params)
        self.lam, self.gamma, self.damping = lam, gamma, damping
        if estimator == "batched":
            raise ValueError("KFACEWC needs per-sample statistics: the batched estimator has no factors")
        self.fisher_options = FisherOptions(estimator, mc_samples, max_samples, chunk_size, seed, progress)
        self.max_factor = int(max_factor)
        self._plan(model)
        self._recording = self.ledger.switch()

    def _ledger_changed(self, old: Any) -> None:
        self._recording = self.ledger.switch()

    # -- which parameters are factored ----------------------------------------------------------------
    def _plan(self, model: nn.Module) -> None:
        engine = CurvatureEngine(model, self.param_names, kfac=True, max_factor=self.max_factor)
        layers = [lay for lay in engine.layers if engine._wants_factors(lay)]
        self.kfac_layers = [lay.name for lay in layers]
        self._layer_params = [(lay.params["weight"], lay.params.get("bias")) for lay in layers]
        factored = {n for pair in self._layer_params for n in pair if n is not None}
        self._diag_names = [n for n in self.param_names if n not in factored]
        index = {n: i for i, n in enumerate(self.param_names)}
        self._layer_index = [(index[w], None if b is None else index[b]) for w, b in self._layer_params]
        self._diag_index = [index[n] for n in self._diag_names]
        self.add_state("anchor", per_parameter=True)
        like = self.anchor.tensors[0]
        a, g = {}, {}
        for name, lay, (_, bias) in zip(self.kfac_layers, layers, self._layer_params):
            w = lay.rule.module.weight
            n_in = w.shape[1:].numel() + (bias is not None)
            a[name] = torch.zeros(n_in, n_in, dtype=like.dtype, device=like.device)
            g[name] = torch.zeros(w.shape[0], w.shape[0], dtype=like.dtype, device=like.device)
        self.add_state("factor_a", a)
        self.add_state("factor_g", g)
        self.add_state("importance", {n: self.anchor.tensors[index[n]].clone() for n in self._diag_names})

    # -- hyperparameters ---------------------------------------------------------------------------
    lam = Hyperparameter(doc="λ ≥ 0.")

    gamma = Hyperparameter(0.0, 1.0, doc="γ ∈ [0, 1], the decay of the running factors.")

    damping = Hyperparameter(doc="δ ≥ 0, added as √δ I to both factors.")

    # -- the pieces of the penalty -----------------------------------------------------------------
    def _factors(self) -> tuple[list[Tensor], list[Tensor]]:
        a, g = self.factor_a.tensors, self.factor_g.tensors
        if self._damping == 0.0:
            return a, g
        root = self._damping**0.5
        eye = lambda t: torch.eye(t.shape[0], dtype=t.dtype, device=t.device) * root  # noqa: E731
        return [t + eye(t) for t in a], [t + eye(t) for t in g]

    def _split(self, params: list[Tensor]) -> tuple[list, list, list[Tensor], list[Tensor]]:
        """(layers, their anchors, the diagonal's parameters, their anchors)."""
        anchors = self.anchor.tensors
        pick = lambda i, src: None if i is None else src[i]  # noqa: E731
        layers = [(params[w], pick(b, params)) for w, b in self._layer_index]
        layer_anchors = [(anchors[w], pick(b, anchors)) for w, b in self._layer_index]
        return layers, layer_anchors, [params[i] for i in self._diag_index], [anchors[i] for i in self._diag_index]

    # -- value -------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """The penalty at the model's current parameters."""
        if self._n_tasks_py == 0:
            value = self._zero()
        else:
            params = self._resolve(model)
            layers, anchors, diag, diag_anchors = self._split(params)
            a, g = self._factors()
            scale = self._lam / 2.0
            with torch.autocast(params[0].device.type, enabled=False):
                if self.attached:
                    value = kfac_penalty_value(layers, anchors, a, g, scale) if layers else self._zero()
                    if diag:
                        value = value + quadratic_penalty_value(diag, self.importance.tensors, diag_anchors, scale)
                else:
                    rec = self.ledger.record_scaled if self._recording(params) else None
                    value = kfac_penalty(layers, anchors, a, g, scale, rec) if layers else self._zero()
                    if diag:
                        value = value + quadratic_penalty(diag, self.importance.tensors, diag_anchors, scale, 0.0, rec)
        self.last_value = value.detach()
        return value

    # -- attached mode -----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> KFACEWC:
        """Add the penalty's closed-form gradient into ``.grad`` on each ``optimizer.step()`` (with
        ``hook=False``, when the caller calls :meth:`pre_step`)."""
        self._register_pre_step(optimizer, hook)
        return self

    def _pre_step(self, mask: list[bool]) -> None:
        if self._n_tasks_py == 0:
            return
        params = self._pset.last()
        layers, anchors, diag, diag_anchors = self._split(params)
        a, g = self._factors()
        scale = self._lam / 2.0
        added: list[tuple[Tensor, Tensor]] = []
        for (w, b), (gw, gb) in zip(layers, kfac_penalty_grad(layers, anchors, a, g, scale)):
            added += [(w, gw)] + ([(b, gb)] if b is not None else [])
        if diag:
            added += list(zip(diag, quadratic_penalty_grad(diag, self.importance.tensors, diag_anchors, scale)))
        live = {id(p) for p, m in zip(params, mask) if m}
        kept = [(p, local(d)) for p, d in added if id(p) in live and p.grad is not None]
        with torch.no_grad():
            for p, d in kept:
                local(p.grad).add_(d)
        if kept and self._recording(params):
            self.ledger.record_unscaled([p for p, _ in kept], [d for _, d in kept])

    # -- consolidation -----------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """A ← γA + A_t, G ← γG + w G_t, F ← γF + w F_t from this task's data; θ* ← θ."""
        if data is None:
            raise ValueError("KFACEWC.consolidate needs the task's data to estimate a Fisher")
        spec = spec or TaskSpec()
        params = self._resolve(model)
        o = self.fisher_options
        curv = fisher_curvature(
            model, data, spec=spec, estimator=o.estimator, params=self.param_names, mc_samples=o.mc_samples,
            seed=o.seed + self._n_tasks_py, max_samples=o.max_samples, chunk_size=o.chunk_size,
            max_factor=self.max_factor, progress=o.progress,
        )  # fmt: skip
        if sorted(curv.factors) != sorted(self.kfac_layers):
            raise ValueError(
                f"KFACEWC: the model's factored layers changed ({sorted(curv.factors)} vs {self.kfac_layers})"
            )
        check_finite("Fisher", {n: curv.diagonal[n] for n in self._diag_names})
        with torch.no_grad():
            for name, a, g in zip(self.kfac_layers, self.factor_a.tensors, self.factor_g.tensors):
                ta, tg = curv.factors[name]
                a.mul_(self._gamma).add_(ta.to(a.dtype))
                g.mul_(self._gamma).add_(tg.to(g.dtype), alpha=spec.weight)
            for big, name in zip(local_all(self.importance.tensors), self._diag_names):
                big.mul_(self._gamma).add_(local(curv.diagonal[name]).to(big.dtype), alpha=spec.weight)
            self.anchor.set([p.detach() for p in params])
        self._bump_tasks()
        self._state_changed()
