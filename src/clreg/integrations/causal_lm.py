r"""Causal language models in the Fisher and in LwF: one sample is one sequence, its token logits
``(B, L, V)`` a dense categorical output with the classes last, the labels shifted by one (position
t predicts token t + 1) and ``-100`` ignored. Needs no framework: any model whose forward takes
``input_ids`` (and ``attention_mask``) as keywords and returns its logits (a Hugging Face
``…ForCausalLM`` returns them under ``"logits"``).

The Fisher of a sequence follows the dense convention: with n the number of labelled tokens,

.. math:: F = \frac{1}{N} \sum_{\text{sequences}} n \, \Big(\nabla_\theta \tfrac{1}{n}
          \textstyle\sum_{t} \log p_\theta(y_{t+1} \mid x_{\le t})\Big)^2,

the mean over sequences of the per-token Fisher's scale, so λ keeps its meaning across sequence
lengths. ``mc`` draws every token's label from the model (one uniform per token and draw: the noise
is k × L, not k × L × V), ``empirical`` uses the data's next tokens, ``batched`` the batch-mean loss;
``exact`` over a vocabulary is refused. The logits are read in place (``OutputSpec.class_dim=-1``,
``shift=1``), never transposed.

Memory: the vectorised path holds a chunk's per-sample gradients and logits, so bound it with
``chunk_size`` (or ``vectorize=False``, one sequence at a time, for long sequences or a large
vocabulary); a model that cannot be vmapped falls back to the per-sample loop.

Example:
    >>> import torch, clreg
    >>> from clreg.integrations.causal_lm import causal_lm_batches, causal_lm_spec
    >>> class TinyLM(torch.nn.Module):
    ...     def __init__(self, vocab=11, dim=8):
    ...         super().__init__()
    ...         self.embed, self.out = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return {"logits": self.out(self.embed(input_ids).cumsum(1))}
    >>> model = TinyLM()
    >>> ids = torch.randint(0, 11, (4, 6))
    >>> batches = causal_lm_batches([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    >>> ewc = clreg.EWC(model, lam=1.0, estimator="empirical")
    >>> ewc.consolidate(model, batches, causal_lm_spec())
    >>> int(ewc.n_tasks)
    1
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data import KeywordInputs
from ..spec import OutputSpec, TaskSpec

__all__ = ["CausalLMBatches", "CausalLMDataset", "causal_lm_batches", "causal_lm_output", "causal_lm_spec"]

INPUT_KEYS = ("input_ids", "attention_mask")


def causal_lm_output(select: Any = "logits", *, ignore_index: int = -100) -> OutputSpec:
    """The token logits ``(B, L, V)`` of a causal LM as an :class:`~clreg.OutputSpec`: classes last,
    labels one position ahead, ``ignore_index`` not counted."""
    return OutputSpec(select=select, kind="softmax", class_dim=-1, shift=1, ignore_index=ignore_index)


def causal_lm_spec(select: Any = "logits", *, ignore_index: int = -100, weight: float = 1.0) -> TaskSpec:
    """A causal LM task's :class:`~clreg.TaskSpec` (see :func:`causal_lm_output`); ``weight`` is w_t."""
    return TaskSpec(outputs=[causal_lm_output(select, ignore_index=ignore_index)], weight=weight)


def _split(
    item: Mapping[str, Tensor],
    input_keys: Sequence[str],
    label_key: str,
    ignore_index: int,
    drop_full_mask: bool = False,
) -> tuple[KeywordInputs, Tensor]:
    if "input_ids" not in item:
        raise ValueError(f"a causal LM batch needs 'input_ids'; got the keys {sorted(item)}")
    inputs = KeywordInputs({k: torch.as_tensor(item[k]) for k in input_keys if k in item})
    labels = item.get(label_key)
    mask = inputs.get("attention_mask")
    if drop_full_mask and mask is not None and bool(mask.all()):
        del inputs["attention_mask"]  # no padding: the model's default, and a mask vmap can trace past
    if labels is not None:
        return inputs, torch.as_tensor(labels)
    labels = inputs["input_ids"].clone()  # the inputs themselves, padding ignored (shifted as the model does)
    if mask is not None:
        labels[mask == 0] = ignore_index
    return inputs, labels


class CausalLMBatches:
    """Dict batches (a Hugging Face ``DataLoader``'s: ``input_ids``, ``attention_mask``, ``labels``)
    as clreg's ``(inputs, labels)``, re-iterable as the underlying batches are: the inputs a
    :class:`~clreg.KeywordInputs` of ``input_keys`` (the model is called as ``model(**inputs)``), the
    labels ``batch[label_key]``, or without them the input ids with padding set to ``ignore_index``.

    A batch without padding loses its all-ones attention mask (``drop_full_mask``): the same model
    outputs, and Hugging Face models check a given mask with data-dependent code that ``vmap`` cannot
    trace, so the vectorised path runs instead of the per-sample loop."""

    def __init__(
        self,
        batches: Iterable[Mapping[str, Tensor]],
        *,
        input_keys: Sequence[str] = INPUT_KEYS,
        label_key: str = "labels",
        ignore_index: int = -100,
        drop_full_mask: bool = True,
    ) -> None:
        if isinstance(batches, Iterator):
            raise TypeError(
                "causal_lm_batches needs batches it can read again (a DataLoader or a list), not an iterator"
            )
        self.batches, self.input_keys, self.label_key, self.ignore_index = batches, input_keys, label_key, ignore_index
        self.drop_full_mask = drop_full_mask

    def __iter__(self) -> Iterator[tuple[KeywordInputs, Tensor]]:
        for batch in self.batches:
            yield _split(batch, self.input_keys, self.label_key, self.ignore_index, self.drop_full_mask)


causal_lm_batches = CausalLMBatches


class CausalLMDataset(Dataset):
    """A map-style dataset of dict items (fixed-length sequences) as ``(inputs, labels)`` items, for
    ``consolidate``'s sharded, batching-independent reading (see :class:`CausalLMBatches`). Items keep
    their attention mask; for unpadded sequences ``input_keys=("input_ids",)`` lets ``vmap`` trace a
    Hugging Face model (with a mask it takes the per-sample loop: the same numbers, slower)."""

    def __init__(
        self,
        dataset: Any,
        *,
        input_keys: Sequence[str] = INPUT_KEYS,
        label_key: str = "labels",
        ignore_index: int = -100,
    ) -> None:
        self.dataset, self.input_keys, self.label_key, self.ignore_index = dataset, input_keys, label_key, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[KeywordInputs, Tensor]:
        return _split(self.dataset[i], self.input_keys, self.label_key, self.ignore_index)
