"""The key/shape spec at full size, checked without allocating any weights."""

import math

import jax
import jax.numpy as jnp
import pytest
import torch

import reference_torch
from checkpoint.presets import PRESETS
from checkpoint.spec import tensor_spec
from model_jax.loading import leaf_names, skeleton
from model_jax.structure import leaf_specs

V01, NEMO = PRESETS["7b-v0.1"], PRESETS["nemo-12b"]


def test_7b_v01_spec_has_291_tensors_of_the_published_shapes():
    spec = tensor_spec(V01)
    assert len(spec) == 291
    assert spec["layers.31.attention.wk.weight"] == (1024, 4096)
    assert spec["layers.0.feed_forward.w2.weight"] == (4096, 14336)


def test_nemo_attention_shapes_use_head_dim_not_dim_over_heads():
    spec = tensor_spec(NEMO)
    assert spec["layers.0.attention.wq.weight"] == (32 * 128, 5120)
    assert spec["layers.0.attention.wo.weight"] == (5120, 32 * 128)


def test_jax_skeleton_stacks_the_blocks_in_the_asked_dtype():
    wq = skeleton(V01, "bfloat16").layers.attention.wq.weight
    assert (wq.shape, wq.dtype) == ((32, 4096, 4096), jnp.bfloat16)


# Parameter counts as each release announced them (model card or launch post), rounded as
# published; Ministral 8B's card gives the exact figure. The spec (from checkpoint/presets.py,
# the releases' params.json) must land on them.
PUBLISHED = {
    "7b-v0.1": (7_241_732_096, 1),  # mistral-src README: 7.24B, exact in the tensor table
    "7b-v0.3": (7.25e9, 0.01e9),
    "mathstral-7b": (7.25e9, 0.01e9),
    "mixtral-8x7b": (46.7e9, 0.05e9),  # "46.7B total parameters"
    "mixtral-8x22b": (141e9, 0.5e9),  # "141B parameters"
    "nemo-12b": (12e9, 0.5e9),
    "codestral-22b": (22.2e9, 0.05e9),
    "small-22b": (22e9, 0.5e9),
    "small-24b": (24e9, 0.5e9),
    "ministral-8b": (8_019_808_256, 1),  # model card: "Parameters 8,019,808,256"
    "large-2-123b": (123e9, 0.5e9),
    # Text decoders (model cards give the language model beside the vision encoder).
    "small-3.1-24b": (23.57e9, 0.01e9),  # Devstral Small 2 card: "23.57B" language model
    "ministral-3-3b": (3.4e9, 0.05e9),  # "3.4B Language Model + 0.4B Vision Encoder"
    "ministral-3-8b": (8.4e9, 0.1e9),  # "8.4B Language Model"
    "ministral-3-14b": (13.5e9, 0.05e9),  # "13.5B Language Model"
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_release_has_its_published_parameter_count(name):
    expected, tolerance = PUBLISHED[name]
    total = sum(math.prod(s) for s in tensor_spec(PRESETS[name]).values())
    assert abs(total - expected) < tolerance, f"{total:,}"


def test_ministral_interleaves_a_full_context_layer_with_three_windowed_ones():
    args = PRESETS["ministral-8b"]
    assert args.window_pattern == (131072, 32768, 32768, 32768)
    assert len(args.layer_windows) == 36


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_every_published_shape_matches_in_both_models_without_allocating(name):
    args = PRESETS[name]
    spec = tensor_spec(args)
    with torch.device("meta"):
        model = reference_torch.Transformer(args)
    assert {k: tuple(p.shape) for k, p in model.state_dict().items()} == spec
    shapes = skeleton(args, "bfloat16")
    leaves = jax.tree_util.tree_leaves(shapes)
    assert sum(math.prod(x.shape) for x in leaves) == sum(math.prod(s) for s in spec.values())
    # The declared structure maps every leaf onto checkpoint names, exactly once each.
    named = {}
    for leaf_spec, leaf in zip(leaf_specs(shapes), leaves, strict=True):
        names = leaf_names(leaf_spec, args)
        assert names.shape == leaf.shape[: names.ndim]
        named |= {n: leaf.shape[names.ndim :] for n in names.flat}
    assert named == spec
