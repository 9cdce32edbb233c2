"""The expert mesh axis on 8 fake CPU devices: a tiny Large-3-like model (dense-first layer,
shared expert, 8 routed experts in 2 groups) and a tiny Mixtral, their routed experts split over
"expert" (and inside each expert over "model"), give the single-device logits, and each device
holds and reads only its own experts' bytes."""

import jax
import pytest
from mla_support import LARGE3
from support import run_on_fake_devices, tiny_args

from checkpoint.args import MoeArgs
from convert.convert import convert_checkpoint
from model_jax.sharding import make_mesh

CONFIGS = {
    "large3": LARGE3,
    "mixtral": tiny_args(
        vocab_size=32000, n_heads=8, n_kv_heads=4, moe=MoeArgs(num_experts=8, num_experts_per_tok=2)
    ),
}
# mesh → parts each routed-expert tensor is cut into. 1x8x1: the 8 experts whole over 8
# devices; 1x4x2: two experts per device, each split over "model" by hidden rows; 1x8 (no
# expert axis): every expert split over "model", as any FFN.
MESHES = {"1x8x1": 8, "1x4x2": 8, "1x8": 8}


def test_mesh_specs_name_data_expert_model():
    assert dict(make_mesh("1x1").shape) == {"data": 1, "expert": 1, "model": 1}
    assert dict(make_mesh("1X1x1").shape) == {"data": 1, "expert": 1, "model": 1}
    for bad in ("8", "1x2x2x2", "1xa", "0x1"):
        with pytest.raises(ValueError, match="mesh"):
            make_mesh(bad)
    with pytest.raises(ValueError, match=f"needs 64 devices, {len(jax.devices())} available"):
        make_mesh("4x4x4")


@pytest.fixture(scope="module", params=CONFIGS)
def found(request, make_checkpoint, tmp_path_factory):
    """The findings of tests/expert_check.py on one config, every mesh."""
    source = make_checkpoint(CONFIGS[request.param], weights_format="safetensors")
    out = tmp_path_factory.mktemp(request.param) / "converted"
    convert_checkpoint(source, out)
    return run_on_fake_devices("expert_check.py", str(out), *MESHES)


@pytest.mark.slow  # a child process per config, loading and compiling the model 4 times
@pytest.mark.parametrize("mesh", MESHES)
def test_expert_parallel_logits_equal_single_device(found, mesh):
    # fp32 at HIGHEST precision: only the order of the sums across devices (all-reduces over
    # "expert" and "model") differs from one device, a few ulps of the largest logit (~1e-6).
    assert found["meshes"][mesh]["logits_rel_error"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_only_its_experts(found, mesh):
    result, share = found["meshes"][mesh], found["routed_bytes"] // MESHES[mesh]
    assert result["own_experts"]  # the device at expert coordinate e holds experts e·N/E …
    assert sorted(result["held"].values()) == [share] * 8


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_reads_only_its_experts_bytes(found, mesh):
    share = found["routed_bytes"] // MESHES[mesh]
    assert sorted(found["meshes"][mesh]["read"].values()) == [share] * 8
