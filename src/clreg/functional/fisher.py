r"""The diagonal Fisher information of a model, per sample, with one switch for the estimator.

Convention: the Fisher is the **mean over samples** (one sample = one input) of the squared gradient
of that sample's log-likelihood, so a penalty's λ does not depend on the batch size:

.. math::

    F_i = \frac{1}{N} \sum_{n=1}^{N} \mathbb{E}_{y \sim p_\theta(\cdot|x_n)}
          \left[ \left( \partial_{\theta_i} \log p_\theta(y \mid x_n) \right)^2 \right].

Output kinds and estimators (a pair outside this table is a ``ValueError``):

=============  =================  ========================  ==================
estimator      (B, C) logits      dense logits (B, C, ...)  per-sample loss
=============  =================  ========================  ==================
``exact``      Σ_c p_c g_c²       no                        no
``mc``         k sampled labels   labels drawn per pixel    no
``empirical``  true labels        true labels (biased)      yes
``batched``    yes                yes                       yes
=============  =================  ========================  ==================

The default (no estimator named, :func:`default_estimator`): ``exact`` for one (B, C) softmax output
with C ≤ :data:`EXACT_MAX_CLASSES` (32), ``mc`` with one draw for other softmax outputs, ``empirical``
for a per-sample loss. ``mc`` is unbiased but its variance is large on a confident model: one rare
class drawn for one sample dominates the sum. Measured by ``benchmarks/fisher_mc_spread.py`` (an MLP
on real 8 × 8 digits, 20 seeds of the draws), the ``mc`` total over the ``exact`` total ranged over
0.006–16 with 1 draw, 0.006–4.1 with 4 and 0.006–4.2 with 16 on a two-digit task (true-class
probability 0.9998), and over 0.45–1.58, 0.79–1.27 and 0.88–1.14 on all ten digits (0.9958); ``exact``
cost 1.6–1.8× one draw there (one backward pass per class; about C/5 times one draw on a 3-layer
MLP at C = 32–200).

Dense logits are a categorical per location with an optional ignore index. Their Fisher is the mean
over the n valid locations of the per-location Fisher — the expected Hessian of the location-averaged
negative log-likelihood, the scale of a pixel-averaged task loss — estimated as
:math:`n \, (\nabla \tfrac{1}{n}\sum_j \log p(y_j|x))^2`. With labels drawn independently per
location (``mc``) the cross terms vanish in expectation and the estimate is unbiased; with the true
labels (``empirical``) it is biased by the correlation between locations.

A per-sample loss ``loss(outputs, target) -> Tensor[B]`` is treated as a negative log-likelihood: the
result is the **empirical Fisher of that loss** (for a detector, of its detection loss).

Sigmoid and regression outputs (no per-sample loss) take ``mc`` alone: labels drawn from the model
(independent Bernoullis per channel and location; a unit-variance Gaussian around a regression
output, with the output's ``weight`` read from the model's own outputs as a per-location weight,
negative weights counting as 0), on the dense convention: the (weighted) mean over locations of the
per-location Fisher (:mod:`clreg.functional.likelihoods`). Their default is ``mc``.

``batched`` is the mean over batches of the squared gradient of the batch-mean loss with the true
labels (as Avalanche computes it). In expectation it equals F/B + (1 − 1/B)(E g)²: biased,
dependent on the batch size B and on how the data is split. It is offered for comparison only.

``mc`` draws (Gumbel-max sampling) are keyed by the sample's index when ``data`` is a ``Dataset``,
so the result depends neither on batching nor on the number of ranks; with an iterable of batches the
key is the sample's position in this rank's stream. Each draw is seeded by ``(seed, key, draw)``.

A model sharded by FSDP2 (``fully_shard``) takes the curvature engine whatever ``engine`` says (the
per-sample path's ``functional_call`` cannot run on FSDP's parameters): FSDP gathers one module's
parameters at a time, each layer's statistic is reduce-scattered as it is formed, and the result is a
DTensor per parameter, sharded like it, equal gathered to the single-process Fisher (see
:mod:`clreg.functional.curvature.engine`). ``batched`` forms each batch's gradient layer by layer too.

Example:
    >>> import torch
    >>> from clreg.functional import fisher_diagonal
    >>> model = torch.nn.Linear(4, 3)
    >>> data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    >>> fisher = fisher_diagonal(model, data, estimator="exact")
    >>> sorted(fisher), fisher["weight"].shape
    (['bias', 'weight'], torch.Size([3, 4]))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

from .._params import ParamSelector, unwrap_model
from .._sharding import NO_SAMPLES, any_rank, fsdp_modules
from ..data import Chunk, call_model, is_map_dataset, iter_chunks, split_item, stable_seed, tree_to
from ..distributed import all_reduce_sum_
from ..spec import OutputSpec, PerSampleLoss, TaskSpec, select_output, select_tensor
from ._per_sample import Objective, PerSampleEngine, ProgressFn, eval_mode, model_device
from .curvature.engine import CurvatureEngine, CurvatureSums, SampleLayoutError
from .likelihoods import bernoulli_loglik_draws, gaussian_score_draws

__all__ = [
    "ENGINES",
    "ESTIMATORS",
    "EXACT_MAX_CLASSES",
    "default_estimator",
    "fisher_curvature",
    "fisher_diagonal",
    "resolve_estimator",
]

log = logging.getLogger("clreg")

ESTIMATORS = ("exact", "mc", "empirical", "batched")
ENGINES = ("auto", "layers", "per_sample")


EXACT_MAX_CLASSES = 32
"""The default estimator is ``exact`` for one (B, C) softmax output of at most this many classes."""


def default_estimator(per_sample_loss: PerSampleLoss | None, output_shapes: Sequence[torch.Size] | None = None) -> str:
    """The estimator used when none is named: ``empirical`` for a per-sample loss; ``exact`` for one
    softmax output of per-sample shape ``(C,)`` with C ≤ :data:`EXACT_MAX_CLASSES` (``output_shapes``:
    the per-sample shapes ``(C, *locations)`` of the outputs); ``mc`` otherwise (dense outputs, several
    outputs, more classes, or shapes unknown).

    ``exact`` costs one backward pass per class; one ``mc`` draw per sample swings by orders of
    magnitude on a confident model (``benchmarks/fisher_mc_spread.py``: 0.006× to 16× the exact total
    over 20 seeds on a two-digit task, where exact cost 1.8× one draw).

    Example:
        >>> import torch
        >>> default_estimator(None, [torch.Size([10])]), default_estimator(None, [torch.Size([21, 64, 64])])
        ('exact', 'mc')
    """
    if per_sample_loss is not None:
        return "empirical"
    if output_shapes is not None and len(output_shapes) == 1:
        shape = output_shapes[0]
        if len(shape) == 1 and shape[0] <= EXACT_MAX_CLASSES:
            return "exact"
    return "mc"


def resolve_estimator(
    model: nn.Module,
    data: Any,
    *,
    spec: TaskSpec | None = None,
    outputs: OutputSpec | Sequence[OutputSpec] | None = None,
    per_sample_loss: PerSampleLoss | None = None,
    estimator: str | None = None,
) -> str:
    """The estimator :func:`fisher_diagonal` uses for these arguments: ``estimator`` when named, else
    :func:`default_estimator` of the outputs' shapes (from one forward of the data's first sample)."""
    req = FisherRequest.of(outputs, per_sample_loss, spec, estimator, 1, model=unwrap_model(model), data=data)
    return req.estimator


def _as_outputs(outputs: OutputSpec | Sequence[OutputSpec] | None) -> tuple[OutputSpec, ...]:
    if outputs is None:
        return (OutputSpec(),)
    if isinstance(outputs, OutputSpec):
        return (outputs,)
    outs = tuple(outputs)
    if not outs or not all(isinstance(o, OutputSpec) for o in outs):
        raise TypeError("outputs must be an OutputSpec or a non-empty sequence of OutputSpec")
    return outs


def target_of(target: Any, spec: OutputSpec) -> Tensor:
    """This output's labels within a task's target (past the first ``spec.shift`` positions)."""
    if target is None:
        raise ValueError("this estimator needs targets: the data gave inputs only")
    if spec.target is not None:
        labels = select_tensor(target, spec.target, "target")
    elif isinstance(target, Tensor):
        labels = target
    elif spec.select is not None and not callable(spec.select):
        labels = select_tensor(target, spec.select, "target")
    else:
        raise ValueError("the target is not a tensor: give OutputSpec(target=...) to pick this output's labels")
    if not spec.shift:
        return labels
    if labels.dim() < 2 or labels.shape[1] <= spec.shift:
        raise ValueError(f"shift {spec.shift} needs labels (B, L) with L > {spec.shift}, got {tuple(labels.shape)}")
    return labels.narrow(1, spec.shift, labels.shape[1] - spec.shift)


def labels_of(target: Any, spec: OutputSpec) -> Tensor:
    """This output's labels as positions in its logits after ``channels`` picks them: with
    ``labels="output"`` (the default) label c becomes c's position in ``channels``; the ignore index
    stays. A label outside the channels becomes 0 here: :func:`_check_labels` refuses it first."""
    labels = target_of(target, spec)
    if spec.channels is None or spec.labels == "channels":
        return labels
    chans = torch.tensor(spec.channels, device=labels.device, dtype=labels.dtype)
    positions = (labels.unsqueeze(-1) == chans).long().argmax(-1)
    if spec.ignore_index is None:
        return positions
    return torch.where(labels == spec.ignore_index, labels.long(), positions)


def class_dim_of(z: Tensor, spec: OutputSpec) -> int:
    """The (non-negative) dimension of ``z``'s classes."""
    d = spec.class_dim % z.dim()
    if d == 0:
        raise ValueError(f"class_dim {spec.class_dim} is the batch dimension of an output of shape {tuple(z.shape)}")
    return d


def _without(shape: torch.Size, dim: int) -> torch.Size:
    return torch.Size([s for i, s in enumerate(shape) if i != dim])


def _logits(outputs: Any, spec: OutputSpec) -> Tensor:
    """The output's logits (half precision upcast), its channels picked and, with ``shift``, its last positions cut,
    in place: the classes stay on ``spec.class_dim``."""
    z = select_tensor(outputs, spec.select)
    if z.dim() < 2:
        raise ValueError(f"softmax output must be (B, C, ...), got shape {tuple(z.shape)}")
    d = class_dim_of(z, spec)
    if spec.channels is not None:
        z = z.index_select(d, torch.tensor(spec.channels, device=z.device))
    if spec.shift:
        t = 2 if d == 1 else 1  # the first location dimension
        if z.dim() < 3 or z.shape[t] <= spec.shift:
            raise ValueError(f"shift {spec.shift} needs a sequence of more positions; got logits {tuple(z.shape)}")
        z = z.narrow(t, 0, z.shape[t] - spec.shift)
    return z if z.dtype in (torch.float32, torch.float64) else z.float()  # half precision upcast


def _per_sample_shape(z: Tensor, spec: OutputSpec) -> torch.Size:
    """``(C, *locations)`` of one sample, whichever dimension holds the classes."""
    d = class_dim_of(z, spec)
    return torch.Size([z.shape[d], *_without(z.shape, d)[1:]])


def scaled_loglik(
    logits: Tensor, labels: Tensor, ignore_index: int | None, valid: Tensor | None = None, class_dim: int = 1
) -> Tensor:
    r"""For one sample (batch dim 1): :math:`\sqrt{n}\cdot\frac{1}{n}\sum_{j \in valid}\log p(y_j)`.

    Its squared gradient is n·(∇ mean log-likelihood)², the per-location Fisher convention; for
    (1, C) logits n = 1 and this is log p(y). The classes are on ``class_dim``.
    """
    if labels.dtype.is_floating_point:
        raise ValueError(f"softmax labels must be integers, got {labels.dtype}")
    labels = labels.reshape(_without(logits.shape, class_dim))
    if valid is None:
        valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = F.log_softmax(logits, dim=class_dim).gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    n = valid.sum().to(logp.dtype)
    return (logp * valid).sum() / torch.sqrt(torch.clamp(n, min=1.0))


def scaled_loglik_draws(logits: Tensor, labels: Tensor, valid: Tensor | None, class_dim: int = 1) -> Tensor:
    """:func:`scaled_loglik` for k label draws at once: logits (1, C, *loc) (or the classes on
    ``class_dim``), labels (k, *loc) → (k,)."""
    k = labels.shape[0]
    logp = F.log_softmax(logits, dim=class_dim)[0]
    if class_dim == 1:
        logp = logp.reshape(logp.shape[0], -1)  # (C, L)
        lp = logp.gather(0, labels.reshape(k, -1))  # (k, L): lp[i, l] = logp[labels[i, l], l]
    else:  # classes last (or moved there, a view): (L, C), gathered without a transposed copy
        logp = logp.movedim(class_dim - 1, -1)
        logp = logp.reshape(-1, logp.shape[-1])
        lp = logp.gather(1, labels.reshape(k, -1).T).T
    if valid is None:
        return lp.sum(1) / float(lp.shape[1]) ** 0.5
    valid = valid.reshape(k, -1).to(lp.dtype)
    n = valid[0].sum().clamp(min=1.0)
    return (lp * valid).sum(1) / n.sqrt()


def _gumbel(u: Tensor) -> Tensor:
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


def _draws(seed: int, keys: Tensor, k: int, shape: torch.Size) -> Tensor:
    """Uniform noise (B, k, *shape), one generator per sample seeded by (seed, key)."""
    out = torch.empty((keys.numel(), k, *shape))
    g = torch.Generator()
    for i, key in enumerate(keys.tolist()):
        g.manual_seed(stable_seed(seed, key))
        out[i] = torch.rand((k, *shape), generator=g)
    return out


def _probe_shapes(model: nn.Module, data: Any, outs: Sequence[OutputSpec]) -> list[torch.Size]:
    """The selected outputs' per-sample shapes, from one forward of the data's first sample (the
    global first sample for a Dataset, so every rank agrees even when its own share is empty)."""
    if is_map_dataset(data):
        if len(data) == 0:
            raise ValueError("the data gave no samples: cannot estimate a Fisher from empty data")
        x = default_collate([split_item(data[0])[0]])
    else:
        first = next(iter_chunks(data, 1), None)
        if fsdp_modules(model) and any_rank(first is None):  # the probe's forward is a collective
            raise ValueError(NO_SAMPLES)
        if first is None:
            raise ValueError("the data gave no samples: cannot estimate a Fisher from empty data")
        x = first.inputs
    with torch.no_grad(), eval_mode(model):
        out = call_model(model, tree_to(x, model_device(model)))
    return [_per_sample_shape(_logits(out, s), s) for s in outs]


def fisher_diagonal(
    model: nn.Module,
    data: Any,
    *,
    outputs: OutputSpec | Sequence[OutputSpec] | None = None,
    per_sample_loss: PerSampleLoss | None = None,
    spec: TaskSpec | None = None,
    estimator: str | None = None,
    params: ParamSelector = None,
    mc_samples: int = 1,
    seed: int = 0,
    max_samples: int | None = None,
    chunk_size: int | None = None,
    batch_size: int = 32,
    vectorize: bool | None = None,
    progress: ProgressFn | None = None,
    engine: str = "auto",
) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` on ``data``, as a dict of parameter name → tensor.

    Args:
        model: any module; DDP and ``torch.compile`` wrappers are looked through (names are the
            underlying module's).
        data: a ``Dataset`` of ``(input, target)`` items, a ``DataLoader`` or an iterable of batches.
        outputs: the softmax outputs whose likelihood counts (default: the whole output); several
            outputs add their log-likelihoods.
        per_sample_loss: ``loss(outputs, target) -> Tensor[B]`` used instead of a likelihood.
        spec: a :class:`~clreg.TaskSpec` giving ``outputs`` and ``per_sample_loss`` at once.
        estimator: ``exact``, ``mc``, ``empirical`` or ``batched``; by default (None, see
            :func:`default_estimator`) ``exact`` for one (B, C) softmax output with C ≤ 32, ``mc``
            for other softmax outputs, ``empirical`` with a per-sample loss.
        params: parameter names or a predicate ``(name, param) -> bool``; default all trainable.
        mc_samples: label draws per sample for ``mc``.
        seed: seeds the ``mc`` draws.
        max_samples: a global bound on the number of samples.
        chunk_size: samples per vectorised chunk (bounds memory); chosen from the model size if None.
        batch_size: batch size of ``batched`` when ``data`` is a Dataset.
        vectorize: ``True`` for ``vmap`` over samples, ``False`` for a per-sample loop; ``None``
            (default) vmaps every estimator but ``exact``, which needs C backward passes per sample
            either way: on the reference CPU model (MobileNetV3-small, 1.9 M parameters) the loop
            was as fast warm and twice as fast cold (see ``benchmarks/step_overhead.py``).
        progress: called as ``progress(samples_done, total_or_None)``.
        engine: ``"layers"`` (the curvature engine, :mod:`clreg.functional.curvature`: per-layer
            statistics from batched passes, the same result to float tolerance; other layer types take
            the per-sample path), ``"per_sample"`` (per-sample gradients by vmap or a loop for every
            parameter) or ``"auto"`` (default: the engine where it covers every selected parameter,
            else the per-sample path, which was faster than the engine plus its second pass on the
            uncovered ones; also the per-sample path where a covered layer's input does not lead with
            the samples, as in a model that flattens samples and positions together, said in the log,
            where ``"layers"`` raises a ValueError; ``vectorize`` given as True or False asks for the
            per-sample path it names).
            On the performance suite's model the engine gave 1.9× (``empirical``), 2.3× (``mc``) and
            3.4× (``exact``) the vectorised path's samples per second, on the one-head model 1.2–1.3×.
    """
    _check_rereadable(data)
    inner = unwrap_model(model)
    req = FisherRequest.of(outputs, per_sample_loss, spec, estimator, mc_samples, seed, model=inner, data=data)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    check = _label_check(req, inner, data)
    sharded = bool(fsdp_modules(inner))
    if req.estimator == "batched":
        batched = _batched_layers if sharded else _batched
        return batched(inner, data, req, params, max_samples, batch_size, progress, check)
    if engine == "auto" and vectorize is not None:
        engine = "per_sample"
    vectorize = req.estimator != "exact" if vectorize is None else vectorize
    objective = _OBJECTIVES[req.estimator, req.per_sample_loss is not None](req, inner, data)
    layers = CurvatureEngine(inner, params) if engine != "per_sample" or sharded else None
    if engine == "auto" and not sharded and layers is not None and layers.fallback:
        layers = None  # a second, per-sample pass for the uncovered parameters: the per-sample path is faster
    if layers is not None:
        try:
            curv = layers.run(
                data, objective.fn, k=objective.k, extra=objective.extra, chunk_size=chunk_size,
                max_samples=max_samples, progress=progress, vectorize=vectorize, check=check,
            )  # fmt: skip
            return {name: s.div_(curv.n) for name, s in curv.diagonal.items()}
        except SampleLayoutError as err:
            if engine == "layers" or sharded:
                raise
            log.info("fisher_diagonal: the per-sample path (%s)", err)
    per_sample = PerSampleEngine(inner, params, vectorize=vectorize)
    sums, n = per_sample.run(
        data,
        objective.fn,
        reduce="square",
        k=objective.k,
        extra=objective.extra,
        chunk_size=chunk_size,
        max_samples=max_samples,
        progress=progress,
        check=check,
    )
    return {name: s.div_(n) for name, s in sums.items()}


def fisher_curvature(
    model: nn.Module,
    data: Any,
    *,
    spec: TaskSpec | None = None,
    outputs: OutputSpec | Sequence[OutputSpec] | None = None,
    per_sample_loss: PerSampleLoss | None = None,
    estimator: str | None = None,
    params: ParamSelector = None,
    mc_samples: int = 1,
    seed: int = 0,
    max_samples: int | None = None,
    chunk_size: int | None = None,
    kfac: bool = True,
    max_factor: int | None = None,
    progress: ProgressFn | None = None,
) -> CurvatureSums:
    """The curvature engine's Fisher: the diagonal (as :func:`fisher_diagonal` gives it) and, with
    ``kfac``, the Kronecker factors (A, G) of every layer that has them and whose factors are at most
    ``max_factor`` rows, each a mean over samples (see :mod:`clreg.functional.curvature.layers` for
    the location scaling). Arguments as :func:`fisher_diagonal`; ``batched`` has no factors."""
    _check_rereadable(data)
    inner = unwrap_model(model)
    req = FisherRequest.of(outputs, per_sample_loss, spec, estimator, mc_samples, seed, model=inner, data=data)
    if req.estimator == "batched":
        raise ValueError("the batched estimator has no per-sample statistics: use exact, mc or empirical")
    objective = _OBJECTIVES[req.estimator, req.per_sample_loss is not None](req, inner, data)
    engine = CurvatureEngine(inner, params, kfac=kfac, max_factor=max_factor)
    sums = engine.run(data, objective.fn, k=objective.k, extra=objective.extra, chunk_size=chunk_size,
                      max_samples=max_samples, progress=progress, vectorize=req.estimator != "exact",
                      check=_label_check(req, inner, data))  # fmt: skip
    for t in sums.diagonal.values():
        t.div_(sums.n)
    for a, g in sums.factors.values():
        a.div_(sums.n)
        g.div_(sums.n)
    return sums


def _one_softmax(outs: Sequence[OutputSpec]) -> bool:
    return len(outs) == 1 and outs[0].kind == "softmax"


def _check_rereadable(data: Any) -> None:
    """The data is read more than once (its first sample probes the output's shape): an iterator or a
    generator would lose what the probe read."""
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}): the Fisher reads it more than once; "
            "pass a Dataset, a DataLoader or a list of batches"
        )


def _label_check(req: FisherRequest, model: nn.Module, data: Any) -> Callable[[Chunk], None] | None:
    """A check that each chunk's labels fit the softmax outputs they are read for (shape, integer,
    in [0, C) or the ignore index), naming the sample; ``None`` when no labels are read."""
    if req.per_sample_loss is not None:
        return None
    outs = [o for o in req.outputs if req.estimator in ("empirical", "batched") or o.ignore_index is not None]
    if not outs:
        return None
    shapes = dict(zip(map(id, req.outputs), _probe_shapes(model, data, req.outputs)))

    def check(ch: Chunk) -> None:
        for o in outs:
            _check_labels(target_of(ch.targets, o), shapes[id(o)], o, ch.keys)

    return check


def _dims(lead: str, dims: tuple[int, ...]) -> str:
    return "(" + ", ".join([lead, *map(str, dims)]) + ")"


def _check_labels(labels: Tensor, shape: torch.Size, o: OutputSpec, keys: Tensor) -> None:
    """``labels`` (B, *locations) against an output of per-sample shape (C, *locations)."""
    which = f" (output {o.select!r})" if o.select is not None else ""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}{which}")
    want, got = tuple(shape[1:]), tuple(labels.shape[1:])
    if got != want and not (want == () and got == (1,)):
        raise ValueError(
            f"labels of shape {_dims('B', got)} for logits of shape {_dims('B, C', want)} with C = {shape[0]}"
            f"{which}: expected labels of shape {_dims('B', want)}"
        )
    if o.channels is not None and o.labels == "output":
        bad = ~torch.isin(labels, torch.tensor(o.channels, device=labels.device))
    else:
        bad = (labels < 0) | (labels >= shape[0])
    if o.ignore_index is not None:
        bad &= labels != o.ignore_index
    if bool(bad.any()):
        i = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0])
        value = int(labels[i][bad[i]].reshape(-1)[0])
        ignore = f" and is not the ignore index {o.ignore_index}" if o.ignore_index is not None else ""
        raise ValueError(f"sample {int(keys[i])}: label {value} {_expected_labels(o, shape[0])}{ignore}{which}")


def _expected_labels(o: OutputSpec, classes: int) -> str:
    if o.channels is None:
        return f"is outside [0, {classes})"
    if o.labels == "output":
        return (
            f"is not one of the selected channels {o.channels} (labels='output': a label is a class index of "
            "the whole output; OutputSpec(labels='channels') reads it as a position in channels)"
        )
    return (
        f"is outside [0, {classes}) (labels='channels': a label is a position in the channels {o.channels}; "
        "OutputSpec(labels='output') reads it as a class index of the whole output)"
    )


# -- the request ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FisherRequest:
    """What a Fisher is asked of: validated once (:meth:`of`), then dispatched on the estimator."""

    outputs: tuple[OutputSpec, ...]
    per_sample_loss: PerSampleLoss | None
    estimator: str
    mc_samples: int
    seed: int = 0

    @classmethod
    def of(
        cls,
        outputs: OutputSpec | Sequence[OutputSpec] | None,
        per_sample_loss: PerSampleLoss | None,
        spec: TaskSpec | None,
        estimator: str | None,
        mc_samples: int,
        seed: int = 0,
        *,
        model: nn.Module | None = None,
        data: Any = None,
    ) -> FisherRequest:
        """The request of :func:`fisher_diagonal`'s arguments, or the ValueError that refuses it. With no
        ``estimator``, the default of :func:`default_estimator`, the outputs' shapes probed on ``model``
        with ``data``'s first sample where they matter (softmax outputs)."""
        if spec is not None:
            if outputs is not None or per_sample_loss is not None:
                raise ValueError("give either spec or outputs/per_sample_loss, not both")
            outputs, per_sample_loss = spec.outputs, spec.per_sample_loss
        outs = _as_outputs(outputs)
        req = cls(outs, per_sample_loss, estimator or default_estimator(per_sample_loss), mc_samples, seed)
        req._check()
        if estimator is None and per_sample_loss is None and model is not None and _one_softmax(outs):
            req = dataclasses.replace(req, estimator=default_estimator(None, _probe_shapes(model, data, outs)))
        return req

    def _check(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be an int >= 1, got {self.mc_samples!r}")
        if self.per_sample_loss is not None:
            if self.estimator in ("exact", "mc"):
                raise ValueError(
                    f"estimator {self.estimator!r} needs a likelihood over softmax outputs; with a per-sample loss "
                    "use 'empirical' (the empirical Fisher of that loss) or 'batched'"
                )
            return
        bad = [o.kind for o in self.outputs if o.kind != "softmax"]
        if bad and self.estimator != "mc":
            raise ValueError(
                f"a Fisher over {bad[0]} outputs takes estimator 'mc' (labels drawn from the model: Bernoulli "
                "for sigmoid, a unit-variance Gaussian for regression) or a per-sample loss "
                f"(TaskSpec(per_sample_loss=...)); got {self.estimator!r}"
            )
        if self.estimator == "exact" and len(self.outputs) != 1:
            raise ValueError("the exact Fisher takes one softmax output; use 'mc' for several")


# -- one objective per estimator --------------------------------------------------------------------


@dataclass(frozen=True)
class PerSampleObjective:
    """What the per-sample engine needs: the objective, its K values per sample, the per-chunk extra."""

    fn: Objective
    k: int = 1
    extra: Callable[[Chunk], Any] | None = None


def _exact(req: FisherRequest, model: nn.Module, data: Any) -> PerSampleObjective:
    r""":math:`\sum_c p_c\, g_c^2` over the C classes of one (B, C) output: K = C values, weights p."""
    shape = _probe_shapes(model, data, req.outputs)[0]
    if len(shape) != 1 and req.outputs[0].class_dim != 1:
        raise ValueError(
            f"the exact Fisher sums over all {shape[0]} classes at each of the {shape[1:].numel()} locations of an "
            "output with its classes on another dimension (token logits over a vocabulary): one backward pass "
            "per class, refused; use 'mc' (labels drawn from the model) or 'empirical' (the true labels)"
        )
    if len(shape) != 1:
        raise ValueError(
            f"the exact Fisher is for (B, C) logits; got an output of shape (B, {', '.join(map(str, shape))}): "
            "use 'mc' for dense outputs"
        )
    spec0 = req.outputs[0]

    def objective(out: Any, target: Any, extra_: Any) -> tuple[Tensor, Tensor]:
        logp = F.log_softmax(_logits(out, spec0), dim=1)[0]
        return logp, logp.detach().exp()

    return PerSampleObjective(objective, k=shape[0])


def _mc(req: FisherRequest, model: nn.Module, data: Any) -> PerSampleObjective:
    """k labels drawn per sample (Gumbel-max, keyed by the sample), each weighted 1/k; dense outputs
    draw independently per location."""
    shapes = _probe_shapes(model, data, req.outputs)
    outs, seed, k = req.outputs, req.seed, req.mc_samples

    def extra(ch: Chunk) -> tuple[Tensor, ...]:
        return tuple(
            _draws(seed * 7919 + j, ch.keys, k, _noise_shape(s, o)) for j, (s, o) in enumerate(zip(shapes, outs))
        )

    def objective(out: Any, target: Any, noise: Any) -> tuple[Tensor, Tensor]:
        total: Tensor | float = 0.0
        for o, u in zip(outs, noise):
            z = _logits(out, o)  # (1, C, *loc), or the classes on o.class_dim
            if o.kind != "softmax":
                total = total + _drawn_likelihood(out, z, u, o)
                continue
            d = class_dim_of(z, o)
            labels = _draw_labels(z.detach(), u, d)  # (k, *loc): k independent draws
            valid = None
            if o.ignore_index is not None and target is not None:
                true = target_of(target, o).reshape(_without(z.shape, d))
                valid = (true != o.ignore_index).expand_as(labels)
            total = total + scaled_loglik_draws(z, labels, valid, d)
        v = total if isinstance(total, Tensor) else torch.zeros(k)
        return v, torch.full_like(v, 1.0 / k).detach()

    return PerSampleObjective(objective, k=k, extra=extra)


def _noise_shape(shape: torch.Size, o: OutputSpec) -> torch.Size:
    """One draw's noise: Gumbel noise per class and location for classes on dim 1, one uniform per
    location otherwise (a vocabulary's k × L × V noise would not fit); a sigmoid or regression
    output's, one uniform per channel and location."""
    return shape if o.class_dim == 1 or o.kind != "softmax" else shape[1:]


def _drawn_likelihood(out: Any, z: Tensor, u: Tensor, o: OutputSpec) -> Tensor:
    """A sigmoid or regression output's k drawn objectives (:mod:`clreg.functional.likelihoods`); a
    regression output's per-location weight is read from the model's own outputs (``o.weight``)."""
    if o.kind == "sigmoid":
        return bernoulli_loglik_draws(z, u)
    if o.weight is None:
        return gaussian_score_draws(z, u)
    w = o.weight(out) if callable(o.weight) else select_output(out, o.weight)
    if not isinstance(w, Tensor) or w[0].numel() != z[0, 0].numel():
        shown = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(
            f"the weight of output {o.select!r} must give one value per location of {tuple(z.shape)}, got {shown}"
        )
    return gaussian_score_draws(z, u, w.detach().float().clamp(min=0.0))


def _draw_labels(z: Tensor, u: Tensor, d: int) -> Tensor:
    """k labels per location from logits z (1, …) with classes on ``d``: Gumbel-max for d = 1 (u: k ×
    classes × locations), else inverse-CDF sampling with one uniform per location (u: k × locations)."""
    if d == 1:
        return (z + _gumbel(u)).argmax(dim=1)
    cdf = torch.softmax(z, dim=d).cumsum(d).movedim(d, -1)  # (1, *loc, C)
    return (cdf < u.unsqueeze(-1)).sum(-1).clamp(max=z.shape[d] - 1)


def _empirical_labels(req: FisherRequest, model: nn.Module, data: Any) -> PerSampleObjective:
    """The log-likelihood of the true labels, summed over the outputs."""
    outs = req.outputs

    def objective(out: Any, target: Any, extra_: Any) -> tuple[Tensor, Tensor]:
        total = 0.0
        for o in outs:
            z = _logits(out, o)
            total = total + scaled_loglik(z, labels_of(target, o), o.ignore_index, class_dim=class_dim_of(z, o))
        v = total.reshape(1)
        return v, torch.ones_like(v)

    return PerSampleObjective(objective)


def _empirical_loss(req: FisherRequest, model: nn.Module, data: Any) -> PerSampleObjective:
    """The per-sample loss, as a negative log-likelihood: the empirical Fisher of that loss."""
    per_sample_loss: PerSampleLoss = req.per_sample_loss  # type: ignore[assignment]  # the table's key

    def objective(out: Any, target: Any, extra_: Any) -> tuple[Tensor, Tensor]:
        loss = per_sample_loss(out, target)
        if loss.dim() != 1:
            raise ValueError(f"per_sample_loss must return Tensor[B], got shape {tuple(loss.shape)}")
        v = loss.reshape(1).float()
        return v, torch.ones_like(v)

    return PerSampleObjective(objective)


_OBJECTIVES: dict[tuple[str, bool], Callable[[FisherRequest, nn.Module, Any], PerSampleObjective]] = {
    ("exact", False): _exact,
    ("mc", False): _mc,
    ("empirical", False): _empirical_labels,
    ("empirical", True): _empirical_loss,
}
"""(estimator, whether a per-sample loss is given) → the objective's builder; ``batched`` runs apart."""


# -- batched ----------------------------------------------------------------------------------------


def _batched(
    model: nn.Module,
    data: Any,
    req: FisherRequest,
    params: ParamSelector,
    max_samples: int | None,
    batch_size: int,
    progress: ProgressFn | None,
    check: Callable[[Chunk], None] | None = None,
) -> dict[str, Tensor]:
    """The mean over batches of the squared gradient of the batch-mean loss (true labels)."""
    engine = PerSampleEngine(model, params)
    names = list(engine.selected)
    plist = [engine.selected[n] for n in names]
    sums = engine.zeros()
    n_batches = 0
    device = engine.device
    with eval_mode(model):
        # a Dataset is read in batches of `batch_size`; an iterable in its own batches
        chunk = batch_size if is_map_dataset(data) else 1 << 62
        for ch in iter_chunks(data, chunk, max_samples):
            if check is not None:
                check(ch)
            x, y = tree_to(ch.inputs, device), tree_to(ch.targets, device)
            with torch.enable_grad():
                loss = _batch_loss(call_model(model, x), y, req)
                grads = torch.autograd.grad(loss, plist, allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    sums[name].add_(g.to(sums[name].dtype).square())
            n_batches += 1
            if progress is not None:
                progress(n_batches, None)
    total = torch.tensor([float(n_batches)], dtype=torch.float64, device=device)
    all_reduce_sum_([*sums.values(), total])
    nb = round(total.item())
    if nb == 0:
        raise ValueError("the data gave no batches: cannot estimate a Fisher from empty data")
    return {engine.canon[name]: s.div_(nb) for name, s in sums.items()}


def _batched_layers(
    model: nn.Module,
    data: Any,
    req: FisherRequest,
    params: ParamSelector,
    max_samples: int | None,
    batch_size: int,
    progress: ProgressFn | None,
    check: Callable[[Chunk], None] | None = None,
) -> dict[str, Tensor]:
    """:func:`_batched` by the curvature engine (a model sharded by FSDP2): the same batches, each
    batch's gradient formed layer by layer."""
    engine = CurvatureEngine(model, params)
    chunk = batch_size if is_map_dataset(data) else 1 << 62
    loss = lambda out, y: _batch_loss(out, y, req)  # noqa: E731
    sums, nb = engine.run_batched(data, loss, chunk, max_samples=max_samples, progress=progress, check=check)
    return {name: s.div_(nb) for name, s in sums.items()}


def _nll(z: Tensor, labels: Tensor, ignore_index: int, d: int) -> Tensor:
    """Cross-entropy per location (0 where ignored) with the classes on dimension ``d``."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    return -F.log_softmax(z, dim=d).gather(d, safe.unsqueeze(d)).squeeze(d) * valid


def _batch_loss(out: Any, y: Any, req: FisherRequest) -> Tensor:
    """The batch-mean loss: the per-sample loss, or the true labels' negative log-likelihood (dense
    outputs: the pixel mean per sample, then the batch mean)."""
    if req.per_sample_loss is not None:
        return req.per_sample_loss(out, y).float().mean()
    loss = 0.0
    for o in req.outputs:
        z = _logits(out, o)
        d = class_dim_of(z, o)
        lab = labels_of(y, o).reshape(_without(z.shape, d)).long()
        ign = -100 if o.ignore_index is None else o.ignore_index
        nll = F.cross_entropy(z, lab, ignore_index=ign, reduction="none") if d == 1 else _nll(z, lab, ign, d)
        if nll.dim() > 1:
            valid = (lab != ign).flatten(1).sum(1).clamp(min=1)
            nll = nll.flatten(1).sum(1) / valid
        loss = loss + nll.mean()
    return loss
