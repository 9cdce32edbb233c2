"""Mixtral routing in both models: top-k order, ties, softmax over the chosen k; full-size spec."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from support import tiny_args

import reference_torch
from checkpoint.args import MoeArgs
from checkpoint.presets import PRESETS
from checkpoint.spec import tensor_spec
from model_jax.loading import skeleton
from model_jax.moe import route
from reference_torch.model import FeedForward
from reference_torch.moe import MoeLayer

MIXTRAL = PRESETS["mixtral-8x7b"]


def torch_route(logits: torch.Tensor, k: int):
    weights, selected = torch.topk(logits, k)
    return torch.softmax(weights, dim=1, dtype=torch.float), selected


def test_top_k_is_ordered_best_first_with_softmax_over_the_chosen():
    logits = np.array([[0.1, 2.0, -1.0, 1.0]], np.float32)
    weights, selected = route(jnp.asarray(logits), 2)
    assert selected.tolist() == [[1, 3]]
    np.testing.assert_allclose(
        np.asarray(weights), [[1 / (1 + np.e**-1), 1 / (1 + np.e)]], rtol=1e-6
    )
    t_weights, t_selected = torch_route(torch.from_numpy(logits), 2)
    assert t_selected.tolist() == selected.tolist()
    np.testing.assert_allclose(t_weights.numpy(), np.asarray(weights), rtol=1e-6)


def test_ties_pick_the_lower_expert_index_in_jax():
    # torch.topk leaves the order of equal values unspecified (on CPU it returns [2, 3] for
    # [1, 3, 3, 3]); the port resolves ties deterministically to the lower expert index. Exact
    # ties of gate logits are the one place the two models may route differently.
    logits = np.array([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 0.0, 2.0]], np.float32)
    weights, selected = route(jnp.asarray(logits), 2)
    assert selected.tolist() == [[1, 2], [0, 1]]
    np.testing.assert_allclose(np.asarray(weights), 0.5)


def test_moe_layer_sums_the_weighted_top_k_experts():
    args = tiny_args(moe=MoeArgs(num_experts=3, num_experts_per_tok=2))
    torch.manual_seed(0)
    layer = MoeLayer(args, FeedForward).eval()
    x = torch.randn(5, args.dim)
    with torch.no_grad():
        weights, selected = torch_route(layer.gate(x), 2)
        expected = torch.stack(
            [
                sum(weights[t, j] * layer.experts[int(selected[t, j])](x[t]) for j in range(2))
                for t in range(5)
            ]
        )
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_mixtral_8x7b_spec_without_allocating():
    spec = tensor_spec(MIXTRAL)
    assert len(spec) == 3 + MIXTRAL.n_layers * (6 + 1 + 3 * 8)
    assert sum(math.prod(s) for s in spec.values()) == 46_702_792_704
    with torch.device("meta"):
        model = reference_torch.Transformer(MIXTRAL)
    assert {k: tuple(p.shape) for k, p in model.state_dict().items()} == spec

    shapes = skeleton(MIXTRAL, "bfloat16")
    w1 = shapes.layers.feed_forward.experts.w1.weight
    assert w1.shape == (32, 8, 14336, 4096)
    assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == 46_702_792_704
