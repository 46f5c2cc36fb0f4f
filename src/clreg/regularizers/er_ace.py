r"""ER-ACE: experience replay with the asymmetric cross-entropy (Caccia, Aljundi, Asadi, Tuytelaars,
Pineau & Belilovsky, ICLR 2022, *New Insights on Reducing Abrupt Representation Change in Online
Continual Learning*).

The incoming batch (x, y) and a draw b from a reservoir buffer of past samples are trained on with

.. math::

    L = \underbrace{-\frac{1}{|V|} \sum_{i \in V} \log
        \frac{e^{z_{i, y_i}}}{\sum_{c \in S} e^{z_{i,c}}}}_{\text{incoming: classes } S \text{ only}}
      \;+\; \underbrace{\mathrm{CE}\big(f_\theta(x_b), y_b\big)}_{\text{replay: every class}}

S is the set of classes **present in the incoming batch** (the paper's definition; the classes absent
from it are masked out of the softmax, so the incoming batch does not push their logits down), V the
incoming labels that are not the output's ``ignore_index`` (every location of a dense output). The
replayed batch takes the plain cross-entropy over every class. Both are means over their labels
(:func:`~clreg.functional.logit_replay.asymmetric_cross_entropy`, :func:`torch.nn.functional.cross_entropy`).

What this module does is the paper's definition, from the first batch on. The implementations in
common use (the authors' released code among them) mask a little less: only from the second task
on (from the first batch when they run without task boundaries), and they keep in the softmax, besides the classes present, every class whose index is at least
the largest seen so far (classes never seen, when classes arrive in index order). The functional
loss's ``present=`` takes any set of classes to keep, which gives that variant (or another).

The incoming term **replaces** the task's cross-entropy: the loop's loss is

.. code-block:: python

    out = model(x)
    loss = er_ace.incoming_loss(out, y) + er_ace(model, inputs=x, outputs=out)
    ...
    er_ace.observe(x, y)

``er_ace(model, ...)`` is the replay term alone (a zero tensor while the buffer is empty: no forward
is run), so ER-ACE composes with the other regularizers (:class:`~clreg.Compose`) like any of them.
The buffer is a :class:`~clreg.logit_buffer.LogitBuffer` of inputs and labels, filled by reservoir
sampling over the whole stream (one global capacity); a draw holds ``min(batch_size, len(buffer))``
samples, uniform without replacement. ``consolidate`` only counts tasks. There is no attached mode
(``attach`` is a ``TypeError``): the replayed term needs a forward, it has no closed-form gradient.

Distributed: the buffer is global (identical on every rank); each rank draws its own replayed batch
(the draw seeded by the rank).
With ``sync_present=True`` (default) the present classes are those of the **global** incoming batch
(one all-reduce of a C-long mask per step), so the loss on each rank's share is the one a single
process gives on the whole batch; ``False`` keeps each rank's own. Under FSDP2 the replayed forward
runs through the sharded model like any other; every rank runs it (the buffer is identical), so the
collectives stay in step.

Example:
    >>> import torch
    >>> from clreg.regularizers.er_ace import ERACE
    >>> model = torch.nn.Linear(4, 5)
    >>> er_ace = ERACE(model, capacity=50, batch_size=4)
    >>> x, y = torch.randn(4, 4), torch.tensor([0, 1, 1, 0])
    >>> out = model(x)
    >>> loss = er_ace.incoming_loss(out, y) + er_ace(model, inputs=x, outputs=out)   # empty buffer: the first term
    >>> er_ace.observe(x, y)
    >>> er_ace(model).item() > 0
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._params import ParamSelector
from ..distributed import _backend_device, is_distributed
from ..functional.fisher import target_of
from ..functional.logit_replay import asymmetric_cross_entropy, compute_dtype, present_classes
from ..spec import OutputSpec, select_tensor
from .der import _BufferReplay

__all__ = ["ERACE"]


def _check_output(output: OutputSpec) -> OutputSpec:
    if not isinstance(output, OutputSpec):
        raise TypeError(f"ERACE output must be an OutputSpec, got {type(output).__name__}")
    if output.kind != "softmax":
        raise ValueError(f"ER-ACE needs a softmax output (class logits), got kind {output.kind!r}")
    if output.channels is not None or output.shift:
        raise ValueError("ER-ACE masks classes by the labels present: OutputSpec.channels and shift are not used")
    return output


class ERACE(_BufferReplay):
    """ER-ACE's replay term and incoming loss (see the module).

    Args:
        model: the model (DDP / compiled wrappers are looked through for the parameters' names).
        capacity: M ≥ 1, the buffer's global capacity.
        batch_size: samples per replayed draw, ≥ 1 (the paper replays as many as arrive: 10).
        output: the class logits (an :class:`~clreg.OutputSpec` of kind softmax; its ``target``,
            ``class_dim`` and ``ignore_index`` are used); default the model's output itself.
        sync_present: under torch.distributed, the present classes of the global incoming batch.
        transform: applied to every replayed batch of inputs (on the model's device) before the forward.
        seed: seeds the reservoir and the draws.
        device: where the buffer keeps its samples (default the CPU).

    State: the buffer (``buffer.*`` in ``state_dict``), the task count and ``batch_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        *,
        batch_size: int = 10,
        output: OutputSpec | None = None,
        sync_present: bool = True,
        transform: Any = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        params: ParamSelector = None,
    ) -> None:
        super().__init__(
            model, capacity, batch_size=batch_size, transform=transform, seed=seed, device=device, params=params
        )
        self.output = _check_output(OutputSpec() if output is None else output)
        self.sync_present = bool(sync_present)

    @property
    def _ignore(self) -> int:
        return -100 if self.output.ignore_index is None else self.output.ignore_index

    # -- the incoming batch -----------------------------------------------------------------------
    def incoming_loss(self, outputs: Any, labels: Any) -> Tensor:
        """The asymmetric cross-entropy of the incoming batch: its logits (``output`` in ``outputs``)
        over the classes present in its labels (the global batch's under ``sync_present``)."""
        z = select_tensor(outputs, self.output.select)
        y = target_of(labels, self.output).to(z.device)
        present = None
        if self.sync_present and is_distributed():
            d = self.output.class_dim % z.dim()
            present = _all_ranks(present_classes(y, z.shape[d], self._ignore))
        return asymmetric_cross_entropy(z, y, present, class_dim=self.output.class_dim, ignore_index=self._ignore)

    def observe(self, inputs: Any, labels: Any) -> None:
        """Offer the incoming batch (inputs and labels) to the reservoir."""
        if labels is None:
            raise ValueError("ERACE.observe needs the batch's labels: er_ace.observe(x, y)")
        self.buffer.observe(inputs, labels)

    # -- the replayed batch -----------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """The plain cross-entropy on a replayed draw; a zero tensor while the buffer is empty. The
        current batch's ``inputs``, where given, set the dtype of the replayed floating inputs;
        ``outputs`` is not used."""
        empty = self._empty(model)
        if empty is not None:
            return empty
        self._resolve(model)
        self._require("labels", "ER-ACE", "observe(x, y)")
        draw, out = self._replay(model, inputs)
        z = select_tensor(out, self.output.select)
        y = target_of(draw.labels, self.output).to(z.device)
        d = self.output.class_dim % z.dim()
        value = F.cross_entropy(z.movedim(d, 1).to(compute_dtype(z)), y.long(), ignore_index=self._ignore)
        self.last_value = value.detach()
        return value


def _all_ranks(mask: Tensor) -> Tensor:
    """The union over ranks of a boolean class mask (one all-reduce, MAX)."""
    flags = mask.to(_backend_device(), torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.to(mask.device).bool()
