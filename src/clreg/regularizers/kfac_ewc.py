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
would not. With ``per_task=True`` each task keeps its own factors, diagonal and anchor, as Ritter
et al. keep one Laplace term per task:

.. math::

    P(\theta) = \frac{\lambda}{2} \sum_t \Bigl[\sum_{\text{layers}} w_t\,\mathrm{tr}\bigl(G_t\,\Delta_t\,A_t\,\Delta_t^\top\bigr)
                + \sum_{\text{other } i} w_t F_{t,i} (\theta_i - \theta^*_{t,i})^2\Bigr], \qquad \Delta_t = \tilde W - \tilde W^*_t,

exact for any number of tasks, at T times the memory and the time of the running sums (per task:
:math:`\sum_\text{layers} (in'^2 + out^2)` numbers for the factors, one per other parameter for the
diagonal and one per parameter for the anchor; :meth:`state_bytes` counts them); γ is not used.
``damping`` δ ≥ 0 (default 0: no inverse is needed) adds :math:`\sqrt\delta\,I` to both factors in
the penalty.

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
from .._sharding import is_sharded, local, local_all
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
        per_task: keep each task's factors, diagonal and anchor apart (T times the state) instead of
            running sums and one anchor; not for FSDP2-sharded parameters.
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
        per_task: bool = False,
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
        self.per_task = bool(per_task)
        if self.per_task and self._gamma != 1.0:
            raise ValueError(
                f"gamma decays the running factors; per_task=True keeps each task's whole (got gamma={gamma})"
            )
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
        zeros = self._pset.zeros(self._pset.last()[0].device)
        if self.per_task and any(is_sharded(z) for z in zeros):
            raise ValueError("KFACEWC(per_task=True) keeps whole per-task anchors: it does not take FSDP2-sharded "
                             "parameters; use the running factors (per_task=False)")  # fmt: skip
        rows = (0,) if self.per_task else ()  # per task: a leading dimension of one row per task
        like = zeros[0]
        a, g = {}, {}
        for name, lay, (_, bias) in zip(self.kfac_layers, layers, self._layer_params):
            w = lay.rule.module.weight
            n_in = w.shape[1:].numel() + (bias is not None)
            a[name] = torch.zeros(*rows, n_in, n_in, dtype=like.dtype, device=like.device)
            g[name] = torch.zeros(*rows, w.shape[0], w.shape[0], dtype=like.dtype, device=like.device)
        if self.per_task:
            self.add_state(
                "anchor", {n: z.new_zeros(0, *z.shape) for n, z in zip(self.param_names, zeros)}, growable=True
            )
        else:
            self.add_state("anchor", per_parameter=True)
        grow = {"growable": True} if self.per_task else {}
        self.add_state("factor_a", a, **grow)
        self.add_state("factor_g", g, **grow)
        diag = {n: zeros[index[n]].new_zeros(*rows, *zeros[index[n]].shape) for n in self._diag_names}
        self.add_state("importance", diag, **grow)

    # -- hyperparameters ---------------------------------------------------------------------------
    lam = Hyperparameter(doc="λ ≥ 0.")

    gamma = Hyperparameter(0.0, 1.0, doc="γ ∈ [0, 1], the decay of the running factors.")

    damping = Hyperparameter(doc="δ ≥ 0, added as √δ I to both factors.")

    # -- the pieces of the penalty -----------------------------------------------------------------
    def _damped(self, factors: list[Tensor]) -> list[Tensor]:
        if self._damping == 0.0:
            return factors
        root = self._damping**0.5
        return [t + torch.eye(t.shape[0], dtype=t.dtype, device=t.device) * root for t in factors]

    def _terms(self) -> list[tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]]:
        """One (anchors, A, G, diagonal) per term of the penalty: the running sums, or each task's."""
        stores = (self.anchor, self.factor_a, self.factor_g, self.importance)
        if not self.per_task:
            return [tuple(st.tensors for st in stores)]  # type: ignore[list-item]
        return [tuple([t[k] for t in st.tensors] for st in stores) for k in range(self._n_tasks_py)]  # type: ignore[misc]

    def _split(self, params: list[Tensor], anchors: list[Tensor]) -> tuple[list, list, list[Tensor], list[Tensor]]:
        """(layers, their anchors, the diagonal's parameters, their anchors)."""
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
            rec = self.ledger.record_scaled if not self.attached and self._recording(params) else None
            with torch.autocast(params[0].device.type, enabled=False):
                value = self._zero()
                for term in self._terms():
                    value = value + self._term_value(params, *term, rec)
        self.last_value = value.detach()
        return value

    def _term_value(self, params: list[Tensor], anchor, a, g, importance, rec) -> Tensor:
        """One term's value: without a graph when attached, else with its closed-form backward."""
        layers, anchors, diag, diag_anchors = self._split(params, anchor)
        a, g, scale = self._damped(a), self._damped(g), self._lam / 2.0
        value = self._zero()
        if self.attached:
            if layers:
                value = value + kfac_penalty_value(layers, anchors, a, g, scale)
            if diag:
                value = value + quadratic_penalty_value(diag, importance, diag_anchors, scale)
            return value
        if layers:
            value = value + kfac_penalty(layers, anchors, a, g, scale, rec)
        if diag:
            value = value + quadratic_penalty(diag, importance, diag_anchors, scale, 0.0, rec)
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
        added: list[tuple[Tensor, Tensor]] = []
        for anchor, a, g, importance in self._terms():
            layers, anchors, diag, diag_anchors = self._split(params, anchor)
            scale = self._lam / 2.0
            for (w, b), (gw, gb) in zip(
                layers, kfac_penalty_grad(layers, anchors, self._damped(a), self._damped(g), scale)
            ):
                added += [(w, gw)] + ([(b, gb)] if b is not None else [])
            if diag:
                added += list(zip(diag, quadratic_penalty_grad(diag, importance, diag_anchors, scale)))
        added = _summed(added)
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
        if self.per_task:
            self._append_task(curv, spec.weight, params)
            return
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

    def factor_bytes(self) -> dict[str, int]:
        """Bytes of the Kronecker factors held per factored layer (A and G; every task's, per task)."""
        return {
            name: a.numel() * a.element_size() + g.numel() * g.element_size()
            for name, a, g in zip(self.kfac_layers, self.factor_a.tensors, self.factor_g.tensors)
        }

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "per_task": self.per_task}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and bool(state.get("per_task", False)) != self.per_task:
            saved = "per task" if state.get("per_task") else "as running sums"
            raise ValueError(f"state keeps its factors {saved}: build the KFACEWC with per_task={not self.per_task}")
        super().set_extra_state(state)

    def _append_task(self, curv: Any, weight: float, params: list[Tensor]) -> None:
        """Per task: this task's A, w G, w F and θ* as a new row of each store."""
        self.factor_a.append([curv.factors[n][0] for n in self.kfac_layers])
        self.factor_g.append([curv.factors[n][1] * weight for n in self.kfac_layers])
        self.importance.append([curv.diagonal[n] * weight for n in self._diag_names])
        self.anchor.append([p.detach() for p in params])
        self._bump_tasks()
        self._state_changed()


def _summed(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, gradient) pairs with each parameter's gradients added (per-task terms)."""
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for p, d in pairs:
        out[id(p)] = (p, out[id(p)][1] + d) if id(p) in out else (p, d)
    return list(out.values())
