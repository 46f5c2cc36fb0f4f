"""``clreg.data``: the tree map every tree helper is written with."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

from clreg.data import tree_index, tree_leaves, tree_map, tree_slice, tree_to, tree_unsqueeze

tensors = st.builds(lambda n, v: torch.full((3, n), float(v)), st.integers(1, 3), st.integers(-5, 5))
others = st.one_of(st.none(), st.integers(), st.text(max_size=3))
trees = st.recursive(
    st.one_of(tensors, others),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=2), kids, max_size=3),
    ),
    max_leaves=10,
)


def same_shape(a: Any, b: Any, leaf) -> None:
    """``b`` has ``a``'s containers (types and keys); ``leaf(x, y)`` checks each pair of leaves."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same_shape(a[k], b[k], leaf)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same_shape(x, y, leaf)
    else:
        leaf(a, b)


def expect_leaf(fn):
    def check(x: Any, y: Any) -> None:
        if isinstance(x, torch.Tensor):
            assert torch.equal(fn(x), y)
        else:
            assert x is y  # anything but a tensor is returned unchanged

    return check


@given(tree=trees)
def test_tree_map_keeps_containers_and_maps_every_tensor(tree: Any) -> None:
    doubled = tree_map(lambda t: t * 2, tree)
    same_shape(tree, doubled, expect_leaf(lambda t: t * 2))
    leaves = tree_leaves(tree)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    assert [t.tolist() for t in tree_leaves(doubled)] == [(t * 2).tolist() for t in leaves]
    assert len(leaves) == len(tree_leaves(tree_map(lambda t: t, tree)))


@given(tree=trees)
def test_tree_helpers_are_the_map_of_one_tensor_operation(tree: Any) -> None:
    same_shape(tree, tree_index(tree, 1), expect_leaf(lambda t: t[1]))
    same_shape(tree, tree_slice(tree, slice(0, 2)), expect_leaf(lambda t: t[0:2]))
    same_shape(tree, tree_unsqueeze(tree), expect_leaf(lambda t: t.unsqueeze(0)))
    same_shape(tree, tree_to(tree, torch.device("cpu")), expect_leaf(lambda t: t))


def test_tree_leaves_order_and_plain_leaves() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert tree_leaves({"x": [a, "s", (b, None)], "y": c}) == [a, b, c]
    assert tree_leaves(3) == [] and tree_map(torch.neg, "text") == "text"
