r"""Drawn log-likelihoods of sigmoid and regression outputs, for the ``mc`` Fisher.

Each output is ``(1, C, *locations)`` for one sample; a location's log-likelihood sums over its C
channels, and the per-sample objective follows the dense convention of
:mod:`clreg.functional.fisher` (the mean over the n locations of the per-location Fisher):

* ``sigmoid``: independent Bernoullis, :math:`y_{c,l} \sim \mathrm{Bernoulli}(\sigma(z_{c,l}))`,

  .. math:: v = \frac{1}{\sqrt n} \sum_l \sum_c y_{c,l} \log\sigma(z_{c,l}) + (1 - y_{c,l}) \log\sigma(-z_{c,l});

* ``regression``: a unit-variance Gaussian around the output, :math:`y = z + \epsilon`,
  :math:`\epsilon \sim \mathcal N(0, I)`, whose log-likelihood has the gradient ε with respect to z, so

  .. math:: v = \frac{1}{\sqrt{W}} \sum_l \sqrt{w_l} \sum_c \epsilon_{c,l}\, z_{c,l}, \qquad W = \sum_l w_l,

  with per-location weights :math:`w_l \ge 0` (1 each by default: W = n).

The draws are independent across locations and channels, so the cross terms of :math:`(\nabla v)^2`
vanish in expectation and :math:`\mathbb E[(\nabla v)^2] = \frac1W \sum_l w_l F_l`: the weighted mean of
the per-location Fishers (:math:`F_l = \sum_c \sigma(1 - \sigma)(\nabla z_{c,l})^2` for a sigmoid,
:math:`\sum_c (\nabla z_{c,l})^2` for a regression output).

Example:
    >>> import torch
    >>> z = torch.zeros(1, 2, 3, requires_grad=True)
    >>> bernoulli_loglik_draws(z, torch.rand(4, 2, 3)).shape
    torch.Size([4])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bernoulli_loglik_draws", "gaussian_score_draws", "standard_normal"]


def bernoulli_loglik_draws(z: Tensor, u: Tensor) -> Tensor:
    """k drawn log-likelihoods (k,) of logits ``z`` ``(1, C, *loc)`` from uniforms ``u`` ``(k, C, *loc)``."""
    y = (u < torch.sigmoid(z.detach())).to(z.dtype)
    ll = y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)  # (k, C, *loc)
    n = ll[0, 0].numel()
    return ll.reshape(ll.shape[0], -1).sum(1) / math.sqrt(n)


def standard_normal(u: Tensor) -> Tensor:
    """Standard normal draws from uniforms in (0, 1) (the inverse CDF)."""
    tiny = torch.finfo(u.dtype).eps
    return math.sqrt(2.0) * torch.erfinv(2 * u.clamp(tiny, 1 - tiny) - 1)


def gaussian_score_draws(z: Tensor, u: Tensor, weight: Tensor | None = None) -> Tensor:
    """k drawn objectives (k,) of outputs ``z`` ``(1, C, *loc)`` with unit-variance Gaussian noise from
    uniforms ``u`` ``(k, C, *loc)``, each location weighted by ``weight`` ``(*loc)`` (≥ 0, detached)."""
    eps = standard_normal(u).to(z.dtype)
    per_location = (eps * z).sum(1)  # (k, *loc)
    if weight is None:
        return per_location.reshape(per_location.shape[0], -1).sum(1) / math.sqrt(per_location[0].numel())
    w = weight.detach().to(z.dtype).reshape(per_location.shape[1:])
    total = w.sum().clamp(min=torch.finfo(z.dtype).tiny)
    return (per_location * w.sqrt()).reshape(per_location.shape[0], -1).sum(1) / total.sqrt()
