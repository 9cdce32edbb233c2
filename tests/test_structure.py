"""The declared parameter structure: every leaf of every release has a placement and checkpoint
names (tests/test_spec.py checks the names against the spec), placements follow the rules on
hand-picked shapes, an undeclared parameter is named; and the rolling cache's `write_slots`."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from support import tiny_args

from checkpoint.presets import PRESETS
from model_jax.cache import write_slots
from model_jax.loading import skeleton
from model_jax.structure import leaf_specs, sharded, stacked


def placements(args, model_devices: int, expert_devices: int = 1) -> dict[str, P]:
    shapes = skeleton(args, "bfloat16")
    mesh_shape = {"data": 1, "expert": expert_devices, "model": model_devices}
    return {
        spec.name: spec.partition_spec(leaf.shape, mesh_shape)
        for spec, leaf in zip(leaf_specs(shapes), jax.tree_util.tree_leaves(shapes), strict=True)
    }


@pytest.mark.parametrize("name", PRESETS)
def test_every_leaf_of_every_release_has_a_declared_placement(name):
    specs = leaf_specs(skeleton(PRESETS[name], "bfloat16"))
    assert specs and all(len(s.axes) >= 1 for s in specs)


def test_7b_places_attention_by_heads_ffn_by_hidden_and_replicates_norms():
    placed = placements(PRESETS["7b-v0.1"], 8)
    assert placed["layers.{layers}.attention.wq.weight"] == P(None, "model", None)
    assert placed["layers.{layers}.attention.wk.weight"] == P(None, "model", None)
    assert placed["layers.{layers}.attention.wo.weight"] == P(None, None, "model")
    assert placed["layers.{layers}.feed_forward.w1.weight"] == P(None, "model", None)
    assert placed["layers.{layers}.feed_forward.w2.weight"] == P(None, None, "model")
    assert placed["layers.{layers}.attention_norm.weight"] == P(None, None)
    assert placed["tok_embeddings.weight"] == P(None, "model")
    assert placed["output.weight"] == P("model", None)
    assert placed["norm.weight"] == P(None)


def test_experts_go_whole_over_the_expert_axis_and_split_by_hidden_over_model():
    mixtral = PRESETS["mixtral-8x7b"]
    w1 = "layers.{layers}.feed_forward.experts.{experts}.w1.weight"
    assert placements(mixtral, 2, 4)[w1] == P(None, "expert", "model", None)  # 8 / 4, 14336 / 2
    assert placements(mixtral, 8, 3)[w1] == P(None, None, "model", None)  # 8 experts % 3
    gate = "layers.{layers}.feed_forward.gate.weight"
    assert placements(mixtral, 2, 4)[gate] == P(None, None, None)


def test_fine_grained_routed_experts_go_over_expert_shared_and_dense_over_model():
    placed = placements(PRESETS["large-3-675b"], 2, 4)
    assert placed["layers.{layers}.experts.{experts}.w2.weight"] == P(None, "expert", None, "model")
    assert placed["layers.{layers}.shared_experts.w1.weight"] == P(None, "model", None)
    assert placed["layers.{layers}.feed_forward.w1.weight"] == P(None, "model", None)  # dense


def test_an_axis_the_mesh_lacks_is_replicated():
    spec = leaf_specs(skeleton(PRESETS["mixtral-8x7b"], "bfloat16"))
    w1 = next(s for s in spec if s.name.endswith("experts.{experts}.w1.weight"))
    assert w1.partition_spec((32, 8, 14336, 4096), {"data": 1, "model": 8}) == P(
        None, None, "model", None
    )


def test_an_axis_the_mesh_does_not_divide_is_replicated():
    odd = tiny_args(hidden_dim=132, n_heads=8, n_kv_heads=2)  # 132 % 8 != 0
    placed = placements(odd, 8)
    assert placed["layers.{layers}.feed_forward.w1.weight"] == P(None, None, None)
    assert placed["layers.{layers}.attention.wk.weight"] == P(None, "model", None)  # 2·16 rows


def test_a_parameter_no_field_declares_is_named():
    class Undeclared(eqx.Module):
        weight: jnp.ndarray

    class Model(eqx.Module):
        ok: Undeclared = sharded(None)
        stack: Undeclared = stacked("layers")

    with pytest.raises(ValueError, match=re.escape("no placement declared for stack.{layers}")):
        leaf_specs(Model(Undeclared(jnp.zeros(2)), Undeclared(jnp.zeros((3, 2)))))


def slots_after(positions, slots=4, chunk_value=None):
    buffer = jnp.full((slots,), -1, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    values = positions if chunk_value is None else jnp.full(positions.shape, chunk_value)
    return np.asarray(write_slots(buffer, values, positions)).tolist()


def test_write_slots_puts_position_p_in_slot_p_mod_slots():
    assert slots_after([0, 1, 2]) == [0, 1, 2, -1]
    assert slots_after([5, 6]) == [-1, 5, 6, -1]


def test_write_slots_wraps_around():
    assert slots_after([3, 4, 5]) == [4, 5, -1, 3]


def test_write_slots_keeps_only_the_last_slots_of_a_longer_chunk():
    assert slots_after(list(range(10))) == [8, 9, 6, 7]


def test_write_slots_never_writes_padding():
    buffer = jnp.asarray([7, 7, 7, 7], jnp.int32)
    positions = jnp.asarray([4, 5, -1, -1], jnp.int32)
    out = write_slots(buffer, jnp.asarray([40, 50, 99, 99], jnp.int32), positions)
    assert np.asarray(out).tolist() == [40, 50, 7, 7]
