r"""Per-layer rules: a layer's per-sample parameter gradients, and its Kronecker factors, from its
input and the gradient with respect to its output, for a batch.

For a layer with input x and output gradient g (one backward of the summed per-sample objective, so
g is each sample's own), sample n's gradient is:

* ``Linear``: :math:`\nabla W_n = \sum_t g_{n,t} x_{n,t}^\top`, :math:`\nabla b_n = \sum_t g_{n,t}`
  over its T locations (T = 1 for a plain (B, in) input, where the squared gradient is
  :math:`g_n^2 (x_n^2)^\top` and no per-sample gradient is formed);
* ``Conv2d`` (groups and depthwise included): the same over the input patches and the output
  locations, group by group; formed, for few input channels per group (depthwise convolutions, a
  stem over the image's channels), as one grouped convolution of the input with each sample's
  output gradient as its kernel (strides and dilations swapped), for a 1 × 1 convolution from the
  (strided) input itself, and otherwise from the unfolded input;
* ``BatchNorm`` (with running statistics: the engine runs in eval mode), ``LayerNorm``, ``GroupNorm``: :math:`\nabla\gamma_n
  = \sum g_n \hat x_n`, :math:`\nabla\beta_n = \sum g_n` over the locations, with :math:`\hat x`
  normalised as the layer does;
* ``Embedding``: row v of :math:`\nabla W_n` is the sum of g over the positions of sample n whose
  index is v (no row for the padding index).

Kronecker factors (K-FAC, Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016), summed
over the batch (the engine divides by the number of samples): for ``Linear`` and ungrouped
``Conv2d`` with the augmented input :math:`\tilde x = [x, 1]` when the layer has a bias,

.. math:: A = \sum_n \frac{1}{T} \sum_t \tilde x_{n,t} \tilde x_{n,t}^\top, \qquad
          G = \sum_n \sum_t g_{n,t} g_{n,t}^\top,

so A averages over locations and G sums over them: with the KFC assumptions (locations uncorrelated,
spatially homogeneous statistics) :math:`A \otimes G` has the scale of the Fisher block
:math:`E[\mathrm{vec}(\nabla W)\mathrm{vec}(\nabla W)^\top]`, and for one sample with one location it
is that block exactly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._sharding import base_type

__all__ = ["Call", "LayerRule", "rule_for"]

_BUDGET = 1 << 25  # elements of per-sample gradients formed at once, per layer (128 MiB in float32)
_CONV_FORM_MAX = 32  # at most this many weights per output channel (C_in/groups · kh · kw): the convolution form


@dataclass
class Call:
    """One call of a layer in the forward pass: its input and the gradient with respect to its output."""

    x: Tensor
    g: Tensor


def _chunks(batch: int, per_sample: int) -> list[slice]:
    step = max(1, _BUDGET // max(1, per_sample))
    return [slice(i, min(batch, i + step)) for i in range(0, batch, step)]


class LayerRule(abc.ABC):
    """How one layer type gives per-sample gradients (and, where it can, Kronecker factors)."""

    names: tuple[str, ...] = ("weight", "bias")
    kfac = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @abc.abstractmethod
    def per_sample(self, calls: Sequence[Call], name: str, sl: slice) -> Tensor:
        """Samples ``sl``'s gradients of parameter ``name`` (summed over the calls), (b, ...) in its shape,
        as a new tensor (the reductions work in place)."""

    def square_sum(self, calls: Sequence[Call], name: str) -> Tensor:
        """Σ over the batch of the squared per-sample gradient of parameter ``name``."""
        return self._reduced(calls, name, lambda t: t.square_())  # per_sample's result is new: in place

    def abs_sum(self, calls: Sequence[Call], name: str) -> Tensor:
        """Σ over the batch of the per-sample gradient's absolute value (MAS)."""
        return self._reduced(calls, name, lambda t: t.abs_())

    def batch_grad(self, calls: Sequence[Call], name: str) -> Tensor:
        """The gradient of the batch's summed objective (Σ over the batch of the per-sample gradients)."""
        return self._reduced(calls, name, lambda t: t)

    def input_factor(self, calls: Sequence[Call]) -> Tensor:
        """K-FAC's A summed over the batch, for the rules that have factors (``kfac``)."""
        raise TypeError(f"{type(self).__name__} has no Kronecker factors")

    def grad_factor(self, calls: Sequence[Call]) -> Tensor:
        """K-FAC's G summed over the batch, for the rules that have factors (``kfac``)."""
        raise TypeError(f"{type(self).__name__} has no Kronecker factors")

    def _reduced(self, calls: Sequence[Call], name: str, fn: Callable[[Tensor], Tensor]) -> Tensor:
        p = getattr(self.module, name)
        batch = calls[0].x.shape[0]
        out = torch.zeros(p.shape, dtype=calls[0].g.dtype, device=p.device)
        for sl in _chunks(batch, p.numel()):
            out += fn(self.per_sample(calls, name, sl)).sum(0)
        return out


class LinearRule(LayerRule):
    kfac = True

    @staticmethod
    def _flat(c: Call) -> tuple[Tensor, Tensor]:
        return c.x.reshape(c.x.shape[0], -1, c.x.shape[-1]), c.g.reshape(c.g.shape[0], -1, c.g.shape[-1])

    def per_sample(self, calls: Sequence[Call], name: str, sl: slice) -> Tensor:
        total = None
        for c in calls:
            x, g = self._flat(c)
            x, g = x[sl].to(g.dtype), g[sl]
            grad = torch.einsum("bto,bti->boi", g, x) if name == "weight" else g.sum(1)
            total = grad if total is None else total + grad
        return total

    def square_sum(self, calls: Sequence[Call], name: str) -> Tensor:
        if len(calls) == 1 and calls[0].x.dim() == 2:  # one location: no per-sample gradient is formed
            x, g = calls[0].x.to(calls[0].g.dtype), calls[0].g
            return g.square().t() @ x.square() if name == "weight" else g.square().sum(0)
        return super().square_sum(calls, name)

    def abs_sum(self, calls: Sequence[Call], name: str) -> Tensor:
        if len(calls) == 1 and calls[0].x.dim() == 2:  # |g_o x_i| = |g_o| |x_i|
            x, g = calls[0].x.to(calls[0].g.dtype), calls[0].g
            return g.abs().t() @ x.abs() if name == "weight" else g.abs().sum(0)
        return super().abs_sum(calls, name)

    def batch_grad(self, calls: Sequence[Call], name: str) -> Tensor:
        total = None
        for c in calls:
            x, g = self._flat(c)
            grad = torch.einsum("bto,bti->oi", g, x.to(g.dtype)) if name == "weight" else g.sum((0, 1))
            total = grad if total is None else total + grad
        return total

    def input_factor(self, calls: Sequence[Call]) -> Tensor:
        """A summed over the batch: Σ_n (1/T) Σ_t x̃ x̃ᵀ (see the module's docstring)."""
        total = None
        for c in calls:
            x = self._flat(c)[0].to(c.g.dtype)
            if self.module.bias is not None:
                x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
            a = torch.einsum("bti,btj->ij", x, x) / x.shape[1]
            total = a if total is None else total + a
        return total

    def grad_factor(self, calls: Sequence[Call]) -> Tensor:
        """G summed over the batch: Σ_n Σ_t g gᵀ."""
        total = None
        for c in calls:
            g = self._flat(c)[1]
            gg = torch.einsum("bto,btp->op", g, g)
            total = gg if total is None else total + gg
        return total


class Conv2dRule(LayerRule):
    def __init__(self, module: nn.Conv2d) -> None:
        super().__init__(module)
        self.kfac = module.groups == 1

    def _patches(self, c: Call, sl: slice) -> tuple[Tensor, Tensor]:
        """Unfolded input (b, groups, C_in/groups · k², L) and output gradient (b, groups, C_out/groups, L)."""
        m = self.module
        x = F.unfold(c.x[sl].to(c.g.dtype), m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        b, groups = x.shape[0], m.groups
        return x.reshape(b, groups, -1, x.shape[-1]), c.g[sl].reshape(b, groups, m.out_channels // groups, -1)

    def per_sample(self, calls: Sequence[Call], name: str, sl: slice) -> Tensor:
        total = None
        for c in calls:
            grad = self._weight_grads(c, sl) if name == "weight" else c.g[sl].flatten(2).sum(-1)
            total = grad if total is None else total + grad
        return total

    def _weight_grads(self, c: Call, sl: slice) -> Tensor:
        """Per-sample weight gradients (b, C_out, C_in/groups, kh, kw), by the cheapest form."""
        m = self.module
        if m.kernel_size == (1, 1) and m.padding == (0, 0) and m.groups == 1:
            x = c.x[sl, :, :: m.stride[0], :: m.stride[1]].to(c.g.dtype)
            g = c.g[sl]
            return torch.einsum("bohw,bihw->boi", g, x).reshape(g.shape[0], *m.weight.shape)
        if m.weight.shape[1:].numel() <= _CONV_FORM_MAX:
            return self._grads_by_convolution(c, sl)
        x, g = self._patches(c, sl)
        return torch.einsum("bgol,bgil->bgoi", g, x).reshape(x.shape[0], *m.weight.shape)

    def _grads_by_convolution(self, c: Call, sl: slice) -> Tensor:
        """Per-sample weight gradients as one convolution: the input, its channels of each group
        as the batch, correlated with every sample's output gradient as a kernel (groups b · groups),
        the original stride as the dilation and the dilation as the stride, cropped to the kernel."""
        m = self.module
        x, g = c.x[sl].to(c.g.dtype), c.g[sl]
        b, (h, w), (ho, wo) = x.shape[0], x.shape[-2:], g.shape[-2:]
        per_in, per_out, kh, kw = m.weight.shape[1], m.out_channels // m.groups, *m.kernel_size
        xs = x.reshape(b, m.groups, per_in, h, w).permute(2, 0, 1, 3, 4).reshape(per_in, b * m.groups, h, w)
        r = F.conv2d(xs, g.reshape(b * m.out_channels, 1, ho, wo), stride=m.dilation, dilation=m.stride,
                     padding=m.padding, groups=b * m.groups)[..., :kh, :kw]  # fmt: skip
        r = r.reshape(per_in, b, m.groups, per_out, kh, kw).permute(1, 2, 3, 0, 4, 5)
        return r.reshape(b, m.out_channels, per_in, kh, kw)

    def input_factor(self, calls: Sequence[Call]) -> Tensor:
        """A summed over the batch: Σ_n (1/L) Σ_l x̃ x̃ᵀ over the input patches (groups == 1)."""
        total = None
        for c in calls:
            x = self._patches(c, slice(None))[0][:, 0]  # (B, C_in·k², L)
            if self.module.bias is not None:
                x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            a = torch.einsum("bil,bjl->ij", x, x) / x.shape[-1]
            total = a if total is None else total + a
        return total

    def grad_factor(self, calls: Sequence[Call]) -> Tensor:
        """G summed over the batch: Σ_n Σ_l g gᵀ over the output locations (groups == 1)."""
        total = None
        for c in calls:
            g = c.g.reshape(c.g.shape[0], self.module.out_channels, -1)  # (B, C_out, L)
            gg = torch.einsum("bol,bpl->op", g, g)
            total = gg if total is None else total + gg
        return total


class NormRule(LayerRule):
    """BatchNorm (eval mode, running statistics), LayerNorm and GroupNorm: affine parameters only."""

    def _normalised(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
        if isinstance(m, nn.LayerNorm):
            dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
            return (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + m.eps)
        groups = x.reshape(x.shape[0], m.num_groups, -1)
        mean, var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
        return ((groups - mean) / torch.sqrt(var + m.eps)).reshape(x.shape)

    def per_sample(self, calls: Sequence[Call], name: str, sl: slice) -> Tensor:
        m = self.module
        total = None
        for c in calls:
            g = c.g[sl]
            term = g * self._normalised(c.x[sl].to(g.dtype)) if name == "weight" else g
            if isinstance(m, nn.LayerNorm):  # sum over the leading (non-normalised) dims
                grad = term.reshape(term.shape[0], -1, *m.normalized_shape).sum(1)
            else:  # per channel, summed over the locations
                grad = term.reshape(term.shape[0], term.shape[1], -1).sum(-1)
            total = grad if total is None else total + grad
        return total


class EmbeddingRule(LayerRule):
    names = ("weight",)

    def per_sample(self, calls: Sequence[Call], name: str, sl: slice) -> Tensor:
        """Dense (b, V, D): sample n's row v is Σ over its positions whose index is v of g (none for
        the padding index). The reductions below form the same sums over the rows that occur only."""
        m = self.module
        b = len(range(*sl.indices(calls[0].x.shape[0])))
        out = torch.zeros(b, *m.weight.shape, dtype=calls[0].g.dtype, device=m.weight.device)
        for c in calls:
            idx, g = c.x[sl].reshape(b, -1), c.g[sl].reshape(b, -1, c.g.shape[-1])
            if m.padding_idx is not None:
                g = g * (idx != m.padding_idx).unsqueeze(-1).to(g.dtype)
            out.scatter_add_(1, idx.unsqueeze(-1).expand_as(g), g)
        return out

    def square_sum(self, calls: Sequence[Call], name: str) -> Tensor:
        """Σ_n Σ_v (Σ_{t: idx_{n,t} = v} g_{n,t})², over the (sample, row) pairs that occur."""
        return self._rows(calls, lambda t: t.square())

    def abs_sum(self, calls: Sequence[Call], name: str) -> Tensor:
        """Σ_n Σ_v abs(Σ_{t: idx_{n,t} = v} g_{n,t})."""
        return self._rows(calls, lambda t: t.abs())

    def batch_grad(self, calls: Sequence[Call], name: str) -> Tensor:
        """Row v: Σ over the positions whose index is v of g (none for the padding index)."""
        return self._rows(calls, lambda t: t)

    def _rows(self, calls: Sequence[Call], fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Σ_n Σ_v fn(Σ_{t: idx_{n,t} = v} g_{n,t}) into row v, over the (sample, row) pairs that occur."""
        m = self.module
        vocab = m.weight.shape[0]
        out = torch.zeros(m.weight.shape, dtype=calls[0].g.dtype, device=m.weight.device)
        batch = calls[0].x.shape[0]
        idx = torch.cat([c.x.reshape(batch, -1) for c in calls], 1)
        g = torch.cat([c.g.reshape(batch, -1, c.g.shape[-1]) for c in calls], 1)
        keys = (idx + vocab * torch.arange(batch, device=idx.device)[:, None]).reshape(-1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(uniq), g.shape[-1], dtype=g.dtype, device=g.device).index_add_(
            0, inverse, g.reshape(-1, g.shape[-1])
        )
        rows = uniq % vocab
        keep = rows != m.padding_idx if m.padding_idx is not None else torch.ones_like(rows, dtype=torch.bool)
        return out.index_add_(0, rows[keep], fn(sums[keep]))


def _plain_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm the rule can read: affine, with running statistics (the engine runs in eval mode,
    so they normalise every sample alike)."""
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.affine
    )


def rule_for(m: nn.Module) -> LayerRule | None:
    """The rule for a module this engine covers, or ``None`` (its parameters take the per-sample path).
    A module ``fully_shard`` was applied to is taken as its own class (``FSDPLinear`` as ``Linear``)."""
    kind = base_type(m)
    if kind is nn.Linear:
        return LinearRule(m)
    if kind is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return Conv2dRule(m)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and _plain_batchnorm(m):
        return NormRule(m)
    if _batchnorm_then_act(m) and _plain_batchnorm(m):
        return NormRule(m)
    if kind in (nn.LayerNorm, nn.GroupNorm) and getattr(m, "weight", None) is not None:
        return NormRule(m)
    if kind is nn.Embedding and m.max_norm is None and not m.sparse:
        return EmbeddingRule(m)
    return None


def _batchnorm_then_act(m: nn.Module) -> bool:
    """A BatchNorm subclass that applies ``drop`` and ``act`` submodules after its normalisation in one
    forward (timm's ``BatchNormAct2d``): its affine output is the input of ``drop``."""
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and type(m).forward is not nn.modules.batchnorm._BatchNorm.forward
        and isinstance(getattr(m, "drop", None), nn.Module)
        and isinstance(getattr(m, "act", None), nn.Module)
    )
