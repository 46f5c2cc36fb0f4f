r"""Feature distillation losses: a student's intermediate features pulled to a teacher's.

Each loss compares one module's output on a batch, the student's :math:`s` and the teacher's
:math:`t` (same shape, batch first), and is **averaged over the batch**. The teacher's features are
detached; every loss computes in float32 or wider.

* ``"l2"``, Less-forgetting learning (LFL; Jung et al., 2016, *Less-forgetting learning in deep
  neural networks*): the squared Euclidean distance between the features, each sample's feature
  flattened to a vector of D elements,

  .. math:: \ell_{l2} = \frac{1}{B} \sum_b \lVert s_b - t_b \rVert_2^2
            = \frac{1}{B} \sum_b \sum_{d=1}^{D} (s_{b,d} - t_{b,d})^2 .

  **Summed** over the feature's elements (the squared norm) and with no ½: a loss written
  :math:`\tfrac12\lVert\cdot\rVert_2^2` is this one with α halved. A sum is
  layout-agnostic (a (B, C, H, W) map and a (B, L, D) token sequence alike, no channel axis to
  guess) but grows with D, so α is tuned per model and module; a mean over elements (as
  ``F.mse_loss`` gives) is this value divided by D.
* ``"cosine"``, LUCIR's less-forget constraint (Hou et al., CVPR 2019, *Learning a unified
  classifier incrementally via rebalancing*): one minus the cosine similarity of the flattened
  features,

  .. math:: \ell_{cos} = \frac{1}{B} \sum_b \left(1 - \langle \bar s_b, \bar t_b \rangle\right),
            \qquad \bar v = v / \max(\lVert v \rVert_2, \epsilon).

  Bounded in [0, 2], scale-free; a zero feature has :math:`\bar v = 0` (so its term is 1).
* ``"pod"``, PODNet's POD-spatial (Douillard et al., ECCV 2020, *PODNet: Pooled outputs distillation
  for small-tasks incremental learning*), for (B, C, H, W) maps. Each sample's map :math:`h` (with
  :math:`a = h^2` elementwise when ``square``, else :math:`a = h`) is summed over its width and over
  its height, and the two poolings are concatenated into one vector of C·(H + W) values,

  .. math::

     \Phi(h) = \Bigl[\bigl(\textstyle\sum_{w} a_{c,y,w}\bigr)_{c,y} \,\Big\Vert\,
               \bigl(\textstyle\sum_{y} a_{c,y,w}\bigr)_{c,w}\Bigr] \in \mathbb{R}^{C(H+W)} .

  With ``normalize=True`` (the default) :math:`\Phi` is L2-normalised per sample, jointly over both
  poolings, and the loss is the **not squared** Euclidean distance, in [0, 2] (in [0, √2] with
  ``square``, whose poolings are ≥ 0):

  .. math:: \ell_{pod} = \frac{1}{B} \sum_b \left\lVert \bar\Phi(s_b) - \bar\Phi(t_b) \right\rVert_2 ,
            \qquad \bar\Phi = \Phi / \max(\lVert \Phi \rVert_2, \epsilon).

  With ``normalize=False`` the poolings are compared raw, by the **squared** distance: POD-width plus
  POD-height, :math:`\sum_{c,y} (\sum_w a^s_{c,y,w} - \sum_w a^t_{c,y,w})^2 + \sum_{c,w}
  (\sum_y a^s_{c,y,w} - \sum_y a^t_{c,y,w})^2`,

  .. math:: \ell_{pod} = \frac{1}{B} \sum_b \left\lVert \Phi(s_b) - \Phi(t_b) \right\rVert_2^2 .

  Two conventions exist. The paper's equations (POD-width + POD-height) pool the activations
  themselves and sum the squared differences of the raw poolings: ``square=False, normalize=False``.
  The authors' released implementation pools the squared activations, normalises and takes the
  not-squared distance: ``square=True, normalize=True``, clreg's default (scale-free, so α does not
  depend on the features' magnitude).

Several modules (:func:`feature_distillation`) combine as :math:`\sum_m w_m \ell(s_m, t_m)`; the
regularizer's default weight is :math:`w_m = 1/M` for M modules, PODNet's average of POD-spatial
over its stages (:math:`\frac{1}{L-1}\sum_{\ell=1}^{L-1}`).

Example:
    >>> import torch
    >>> from clreg.functional.feature_distillation import pod_spatial_distillation
    >>> h = torch.rand(2, 3, 4, 5)
    >>> pod_spatial_distillation(h, h).item()
    0.0
    >>> round(pod_spatial_distillation(h, 2 * h).item(), 6)   # normalised: directions only
    0.0
    >>> pod_spatial_distillation(h, 2 * h, normalize=False) > 0
    tensor(True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FEATURE_KINDS",
    "cosine_feature_distillation",
    "feature_distillation",
    "l2_feature_distillation",
    "pod_spatial_distillation",
    "pod_spatial_pooling",
]

FEATURE_KINDS = ("l2", "cosine", "pod")
"""The feature distillation losses, by name."""


def _pair(student: Tensor, teacher: Tensor, min_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Both as float32 or wider, the teacher detached; a ValueError when their shapes differ."""
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(f"features must be tensors, got {type(student).__name__} and {type(teacher).__name__}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher features differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    if student.dim() < min_dim or student.shape[0] == 0:
        raise ValueError(f"features must be batch-first with at least one sample, got shape {tuple(student.shape)}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    return student.to(dtype), teacher.detach().to(dtype)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def l2_feature_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """LFL: ‖s_b − t_b‖² summed over each sample's flattened feature, mean over the batch."""
    s, t = _pair(student, teacher)
    return (_flat(s) - _flat(t)).square().sum(1).mean()


def cosine_feature_distillation(student: Tensor, teacher: Tensor, eps: float = 1e-12) -> Tensor:
    """LUCIR: 1 − cos(s_b, t_b) of the flattened features (each L2-normalised), mean over the batch."""
    s, t = _pair(student, teacher)
    s_bar, t_bar = F.normalize(_flat(s), dim=1, eps=eps), F.normalize(_flat(t), dim=1, eps=eps)
    return (1 - (s_bar * t_bar).sum(1)).mean()


def pod_spatial_pooling(h: Tensor, square: bool = True) -> Tensor:
    """PODNet's Φ(h) for a (B, C, H, W) map (of h² with ``square``): [Σ over W, (B, C·H) ‖ Σ over H,
    (B, C·W)], not normalised."""
    if h.dim() != 4:
        raise ValueError(f"'pod' needs (B, C, H, W) features, got shape {tuple(h.shape)}")
    a = h.square() if square else h
    return torch.cat([_flat(a.sum(3)), _flat(a.sum(2))], dim=1)


def pod_spatial_distillation(
    student: Tensor, teacher: Tensor, *, square: bool = True, normalize: bool = True, eps: float = 1e-12
) -> Tensor:
    """PODNet's POD-spatial, mean over the batch: ‖Φ̄(s_b) − Φ̄(t_b)‖₂ (not squared) with ``normalize``,
    else ‖Φ(s_b) − Φ(t_b)‖₂² (see the module for Φ and the two conventions)."""
    s, t = _pair(student, teacher)
    phi_s, phi_t = pod_spatial_pooling(s, square), pod_spatial_pooling(t, square)
    if not normalize:
        return (phi_s - phi_t).square().sum(1).mean()
    phi_s, phi_t = F.normalize(phi_s, dim=1, eps=eps), F.normalize(phi_t, dim=1, eps=eps)
    return torch.linalg.vector_norm(phi_s - phi_t, dim=1).mean()


def _loss(kind: str, square: bool, normalize: bool, eps: float) -> Callable[[Tensor, Tensor], Tensor]:
    if kind == "l2":
        return l2_feature_distillation
    if kind == "cosine":
        return lambda s, t: cosine_feature_distillation(s, t, eps)
    if kind == "pod":
        return lambda s, t: pod_spatial_distillation(s, t, square=square, normalize=normalize, eps=eps)
    raise ValueError(f"feature distillation kind must be one of {FEATURE_KINDS}, got {kind!r}")


def feature_distillation(
    students: Mapping[str, Tensor],
    teachers: Mapping[str, Tensor],
    kind: str,
    weights: Mapping[str, float] | None = None,
    *,
    square: bool = True,
    normalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """Σ_m w_m ℓ_kind(students[m], teachers[m]) over the modules of ``weights`` (default: every key of
    ``students``, each weighted 1/M). A ValueError names a module whose features are missing or do
    not fit. ``square`` and ``normalize`` apply to ``"pod"`` only."""
    loss = _loss(kind, square, normalize, eps)
    if weights is None:
        weights = {name: 1.0 / max(len(students), 1) for name in students}
    if not weights:
        raise ValueError("feature distillation needs at least one module")
    terms = []
    for name, w in weights.items():
        if name not in students or name not in teachers:
            side = "student" if name not in students else "teacher"
            raise ValueError(f"no {side} features for module {name!r}")
        try:
            terms.append(w * loss(students[name], teachers[name]))
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from err
    return sum(terms[1:], terms[0])
