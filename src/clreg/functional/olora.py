r"""O-LoRA's orthogonality between LoRA subspaces (Wang et al., Findings of EMNLP 2023, *Orthogonal
Subspace Learning for Language Model Continual Learning*): pure math on tensors.

A LoRA layer adds :math:`\Delta W = B A` to a frozen weight, with :math:`A \in \mathbb{R}^{r \times
d_{in}}` (PEFT's ``lora_A`` weight; a convolution's flattened to :math:`r \times d_{in} k_h k_w`). The
update reads its input through the row space of A only, so O-LoRA keeps the row space of the current
task's :math:`A_t` orthogonal to those of the earlier tasks' :math:`A_s` (the paper's overlap
:math:`O_{s,t} = A_s^\top A_t` in its column layout is :math:`A_s A_t^\top` in PEFT's). Per layer and
earlier task, with :math:`r_t, r_s` the ranks:

* ``normalize=None``, the paper's form:
  :math:`\rho(A_t, A_s) = \lVert A_t A_s^\top \rVert_F^2 = \sum_{j,k} (a_{t,j} \cdot a_{s,k})^2`;
* ``"subspace"`` (the default): the mean squared cosine of the principal angles between the two row
  spaces,

  .. math:: \rho(A_t, A_s) = \frac{\lVert Q_t Q_s^\top \rVert_F^2}{\min(r_t, k_s)} \in [0, 1],

  with :math:`Q_t, Q_s` orthonormal bases of the row spaces and :math:`k_s \le r_s` the dimension of
  :math:`A_s`'s (its numerical rank). 0 exactly when the subspaces are orthogonal, 1 exactly when one
  contains the other (identical subspaces); invariant to the scale of A and to the basis chosen
  within its row space. :math:`Q_t = C^{-1} A_t` with :math:`C C^\top = A_t A_t^\top + \delta I`,
  :math:`\delta = \epsilon \operatorname{tr}(A_t A_t^\top) / r_t` (a ridge that keeps the Cholesky
  factor defined when :math:`A_t` loses rank; it lowers the value by a relative
  :math:`O(\epsilon\, \kappa(A_t)^2)`); :math:`Q_s` from the SVD of the stored :math:`A_s` (right
  singular vectors whose singular value exceeds :math:`\max(r_s, d)\, \varepsilon_{dtype}\,
  \sigma_{max}`);
* ``"cosine"``: the mean over row pairs of the squared cosine between rows,
  :math:`\rho = \frac{1}{r_t r_s} \sum_{j,k} \cos^2(a_{t,j}, a_{s,k}) \in [0, 1]`: cheaper (no
  Cholesky), 0 exactly for orthogonal subspaces, but basis-dependent (identical subspaces of rank r
  with orthogonal rows give 1/r; 1 needs every row parallel).

The value over layers :math:`\ell = 1 \dots L` and earlier tasks :math:`s < t` is the sum for ``None``
(the paper's :math:`\sum_\ell \sum_{s<t} \lVert A_t A_s^\top \rVert_F^2`) and the mean for the
normalised forms,

.. math:: O = \frac{1}{L} \sum_\ell \frac{1}{t - 1} \sum_{s<t} \rho(A_{t,\ell}, A_{s,\ell}) \in [0, 1],

so λ₁ multiplies a number between 0 (every subspace orthogonal to every earlier one) and 1 (every
subspace inside an earlier one) whatever the ranks, widths, number of layers and of tasks.

Every earlier task's form (:func:`past_form`) is computed once; the current one (:func:`current_form`)
is differentiable, batched over leading dimensions, and the overlap (:func:`layer_overlap`) is one
matrix product per group of layers of equal shapes. :func:`layer_overlap_grad` gives the same value
with its gradient with respect to :math:`A_t` in closed form (no autograd graph), for the attached
mode: with :math:`P = A_t Y^\top` (Y the earlier forms, W their column weights),

* ``None``: :math:`\nabla = 2 (P W) Y`;
* ``"cosine"``: with :math:`X` the unit rows :math:`x_j = a_j / \lVert a_j \rVert` and
  :math:`G = 2 (X Y^\top W) Y`, row j of the gradient is
  :math:`(g_j - (g_j \cdot x_j)\, x_j) / \lVert a_j \rVert`;
* ``"subspace"``: the value is :math:`\operatorname{tr}(G^{-1} P W P^\top)` with
  :math:`G = A_t A_t^\top + \delta I`; with :math:`M = G^{-1} P` and :math:`H = M W M^\top`,
  :math:`\nabla = 2 M W Y - 2 H A_t - \frac{2 \epsilon}{r_t} \operatorname{tr}(H)\, A_t` (the last
  term from the ridge's dependence on :math:`A_t`).

Example:
    >>> import torch
    >>> from clreg.functional.olora import orthogonality
    >>> eye = torch.eye(4)
    >>> a_1, a_2 = eye[:2], eye[2:]                             # two orthogonal rank-2 subspaces of R^4
    >>> orthogonality([a_2], [[a_1]]).item()                     # the current adapter a_2, task 1's a_1
    0.0
    >>> round(orthogonality([torch.tensor([[2.0, 1, 0, 0]])], [[a_1]]).item(), 4)   # a line in task 1's plane
    1.0
    >>> orthogonality([3 * a_1], [[a_1]], normalize=None).item()          # the paper's raw form
    18.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "NORMALIZATIONS",
    "check_normalize",
    "column_weights",
    "current_form",
    "layer_overlap",
    "layer_overlap_grad",
    "orthogonality",
    "past_form",
]

NORMALIZATIONS = (None, "subspace", "cosine")
"""The forms of the overlap: the paper's raw one (``None``) and two normalised to [0, 1]."""


def check_normalize(normalize: str | None) -> str | None:
    """``normalize`` if it is one of :data:`NORMALIZATIONS`, else a ValueError."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


def _unit_rows(a: Tensor) -> Tensor:
    """Rows scaled to unit norm (a zero row stays zero)."""
    return a / a.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def _row_basis(a: Tensor) -> Tensor:
    """An orthonormal basis (k × d) of the row space of one r × d matrix, from its SVD."""
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return a.new_zeros(0, a.shape[-1])
    tol = max(a.shape) * torch.finfo(a.dtype).eps * s[0]
    return vh[: int((s > tol).sum())]


def past_form(a: Tensor, normalize: str | None) -> Tensor:
    """What the overlap reads of an earlier task's A_s (r_s × d, no gradient): A_s itself (``None``),
    its rows at unit norm (``"cosine"``) or an orthonormal basis of its row space, k_s ≤ r_s rows
    (``"subspace"``)."""
    if a.dim() != 2:
        raise ValueError(f"an adapter's A must be a matrix (rank × input width), got shape {tuple(a.shape)}")
    a = a.detach()
    if normalize == "subspace":
        return _row_basis(a)
    return _unit_rows(a) if normalize == "cosine" else a


def current_form(a: Tensor, normalize: str | None, eps: float = 1e-6) -> Tensor:
    """What the overlap reads of the current A_t (…, r_t, d), differentiably: A_t (``None``), its
    rows at unit norm (``"cosine"``) or :math:`C^{-1} A_t` with :math:`C C^\\top = A_t A_t^\\top +
    \\delta I` (``"subspace"``, orthonormal rows up to the ridge δ = eps·tr(A_t A_tᵀ)/r_t)."""
    if normalize == "cosine":
        return _unit_rows(a)
    if normalize != "subspace":
        return a
    gram = a @ a.transpose(-1, -2)
    r = a.shape[-2]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    ridge = eps * trace / r + torch.finfo(a.dtype).tiny
    eye = torch.eye(r, dtype=a.dtype, device=a.device)
    chol = torch.linalg.cholesky(gram + ridge[..., None, None] * eye)
    return torch.linalg.solve_triangular(chol, a, upper=False)


def column_weights(rank: int, dims: Sequence[int], normalize: str | None, **factory) -> Tensor:
    """The weight of each column of the concatenated earlier forms (Σ dims columns, task s's block of
    ``dims[s]`` columns): 1 (``None``), 1 / (r_t r_s (t − 1)) (``"cosine"``, ``dims`` the ranks) or
    1 / (min(r_t, k_s) (t − 1)) (``"subspace"``, ``dims`` the subspaces' dimensions)."""
    n = len(dims)
    if normalize is None:
        per_task = [1.0] * n
    elif normalize == "cosine":
        per_task = [1.0 / (rank * d * n) if d else 0.0 for d in dims]
    else:
        per_task = [1.0 / (min(rank, d) * n) if d else 0.0 for d in dims]
    return torch.cat([torch.full((d,), w, **factory) for w, d in zip(per_task, dims)])


def layer_overlap(current: Tensor, past: Tensor, weights: Tensor) -> Tensor:
    """Σ_c w_c Σ_j (X Yᵀ)²_jc for the current form X (…, r_t, d), the earlier forms Y (…, R, d) and
    the column weights w (R,): one value per leading index."""
    if past.shape[-2] == 0:
        return current.new_zeros(current.shape[:-2])
    product = current @ past.transpose(-1, -2)
    return product.square().sum(-2) @ weights


def layer_overlap_grad(
    current: Tensor, past: Tensor, weights: Tensor, normalize: str | None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """:func:`layer_overlap` of ``current_form(current)`` and its gradient with respect to ``current``
    (…, r_t, d), in closed form (see the module; no autograd graph): ``(value (…), gradient (…, r_t, d))``."""
    a = current.detach()
    if past.shape[-2] == 0:
        return a.new_zeros(a.shape[:-2]), torch.zeros_like(a)
    if normalize == "subspace":
        r = a.shape[-2]
        gram = a @ a.transpose(-1, -2)
        ridge = eps * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / r + torch.finfo(a.dtype).tiny
        chol = torch.linalg.cholesky(gram + ridge[..., None, None] * torch.eye(r, dtype=a.dtype, device=a.device))
        product = a @ past.transpose(-1, -2)  # P = A Yᵀ
        m = torch.cholesky_solve(product, chol)  # M = G⁻¹ P
        mw = m * weights
        h = mw @ m.transpose(-1, -2)  # H = G⁻¹ P W Pᵀ G⁻¹
        value = (mw * product).sum((-2, -1))
        trace = h.diagonal(dim1=-2, dim2=-1).sum(-1)
        grad = 2 * (mw @ past) - 2 * (h @ a) - (2 * eps / r) * trace[..., None, None] * a
        return value, grad
    if normalize == "cosine":
        norms = a.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        x = a / norms
        product = x @ past.transpose(-1, -2)
        g = 2 * ((product * weights) @ past)
        grad = (g - (g * x).sum(-1, keepdim=True) * x) / norms
        return (product.square() * weights).sum((-2, -1)), grad
    product = a @ past.transpose(-1, -2)
    return (product.square() * weights).sum((-2, -1)), 2 * ((product * weights) @ past)


def orthogonality(
    current: Sequence[Tensor],
    past: Sequence[Sequence[Tensor]],
    normalize: str | None = "subspace",
    eps: float = 1e-6,
) -> Tensor:
    """O-LoRA's orthogonality term (see the module): ``current[l]`` the current A_t of layer l
    (r_t × d_l), ``past[l]`` the earlier tasks' A_s of that layer, oldest first (the same number of
    tasks at every layer; ranks may differ). A zero tensor when there is no earlier task."""
    check_normalize(normalize)
    if len(current) != len(past):
        raise ValueError(f"expected the earlier A's of {len(current)} layers, got {len(past)}")
    if not current:
        raise ValueError("no layer given")
    values = []
    for a_t, earlier in zip(current, past):
        if not earlier:
            return a_t.new_zeros(())
        for a_s in earlier:
            if a_s.dim() != 2 or a_s.shape[-1] != a_t.shape[-1]:
                raise ValueError(
                    f"an earlier A of shape {tuple(a_s.shape)} against a current A of shape {tuple(a_t.shape)}"
                )
        forms = [past_form(a_s.to(a_t.dtype), normalize) for a_s in earlier]
        weights = column_weights(
            a_t.shape[0], [f.shape[0] for f in forms], normalize, dtype=a_t.dtype, device=a_t.device
        )
        values.append(layer_overlap(current_form(a_t, normalize, eps), torch.cat(forms), weights))
    total = torch.stack(values).sum()
    return total if normalize is None else total / len(values)
