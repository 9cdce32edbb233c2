"""The key/shape spec at full size, checked without allocating any weights."""

import math

import jax
import jax.numpy as jnp
import pytest
import torch
from conftest import zeros_getter

import reference_torch
from checkpoint.presets import PRESETS
from checkpoint.spec import tensor_spec
from model_jax.model import Transformer

V01, NEMO = PRESETS["7b-v0.1"], PRESETS["nemo-12b"]


def test_7b_v01_spec_has_291_tensors_and_7_241_732_096_parameters():
    spec = tensor_spec(V01)
    assert len(spec) == 291
    assert sum(math.prod(s) for s in spec.values()) == 7_241_732_096
    assert spec["layers.31.attention.wk.weight"] == (1024, 4096)
    assert spec["layers.0.feed_forward.w2.weight"] == (4096, 14336)


def test_nemo_attention_shapes_use_head_dim_not_dim_over_heads():
    spec = tensor_spec(NEMO)
    assert spec["layers.0.attention.wq.weight"] == (32 * 128, 5120)
    assert spec["layers.0.attention.wo.weight"] == (5120, 32 * 128)


def test_torch_reference_on_meta_matches_spec():
    with torch.device("meta"):
        model = reference_torch.Transformer(V01)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes == tensor_spec(V01)


def test_jax_model_skeleton_matches_spec_without_allocating():
    get = zeros_getter(V01, jnp.bfloat16)
    skeleton = jax.eval_shape(lambda: Transformer.load(V01, get))
    leaves = jax.tree_util.tree_leaves_with_path(skeleton)
    assert sum(math.prod(leaf.shape) for _, leaf in leaves) == 7_241_732_096
    wq = skeleton.layers.attention.wq.weight
    assert (wq.shape, wq.dtype) == ((32, 4096, 4096), jnp.bfloat16)


@pytest.mark.parametrize("name", PRESETS)
def test_every_published_shape_matches_in_both_models_without_allocating(name):
    args = PRESETS[name]
    spec = tensor_spec(args)
    with torch.device("meta"):
        model = reference_torch.Transformer(args)
    assert {k: tuple(p.shape) for k, p in model.state_dict().items()} == spec
    skeleton = jax.eval_shape(lambda: Transformer.load(args, zeros_getter(args, jnp.bfloat16)))
    leaves = jax.tree_util.tree_leaves(skeleton)
    assert sum(math.prod(x.shape) for x in leaves) == sum(math.prod(s) for s in spec.values())
