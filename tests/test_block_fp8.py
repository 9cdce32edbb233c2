"""Block FP8 (Mistral Large 3's `quantization_config`: compressed-tensors, `X.weight_scale` one
scale per block of the weight) on a tiny Large-3-shaped model with 8×12 blocks, so that every
weight has several blocks both ways and some have partial ones: params refused by name where
the scheme is not this one, scales checked by shape, the weights kept byte for byte or
dequantized exactly as fp8 × the scale of their block, both models equal on it, and verify
failing a port that reads the scales transposed."""

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mla_support import LARGE3
from safetensors.torch import load_file

import model_jax
import model_jax.layers as jax_layers
import reference_torch
from checkpoint.args import ModelArgs
from checkpoint.folder import open_folder
from checkpoint.sections import BlockFP8Args
from checkpoint.tiny import (
    block_fp8_config,
    quantize_fp8_blocks,
    random_state_dict,
    write_tiny_checkpoint,
)
from convert import convert as convert_module
from convert import fp8
from convert.cli import main as convert_cli
from convert.convert import convert_checkpoint
from reference_torch.loading import dequantize
from verify.run import run_verification

BLOCK = (8, 12)
ARGS = dataclasses.replace(LARGE3, quantization_config=BlockFP8Args(**block_fp8_config(BLOCK)))
# As Large 3 ships: the latent projections' first halves and the router unquantized.
UNQUANTIZED = ("wq_a", "wkv_a_with_mqa", ".gate.")
PROMPT = "Each weight block carries its own scale, and the last blocks of a row are partial."


def quantized_names(state) -> list[str]:
    return [
        n
        for n in state
        if n.startswith("layers.")
        and n.endswith(".weight")
        and state[n].ndim == 2
        and not any(u in n for u in UNQUANTIZED)
    ]


def block_state(scale_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    state = random_state_dict(LARGE3, seed=3)
    return quantize_fp8_blocks(state, quantized_names(state), BLOCK, scale_dtype=scale_dtype)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large3-block-fp8") / "src"
    return write_tiny_checkpoint(folder, ARGS, state=block_state(), weights_format="safetensors")


def test_the_scale_covers_its_block_partial_blocks_included():
    block = (16, 16)
    weight = torch.arange(40 * 20, dtype=torch.float32).reshape(40, 20).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 40×20 in 16×16: 3 × 2 blocks
    real = dequantize(weight, scale, block)
    fp = weight.float()
    assert torch.equal(real[:16, :16], fp[:16, :16] * 1.0)
    assert torch.equal(real[:16, 16:], fp[:16, 16:] * 2.0)
    assert torch.equal(real[32:, 16:], fp[32:, 16:] * 6.0)  # the partial corner block
    for first, n in [(0, 40), (5, 20), (31, 2), (39, 1)]:  # rows across block edges
        rows = fp8.WeightScale(scale.numpy(), block).rows(first, n, (40, 20))
        expected = scale.repeat_interleave(16, 0)[first : first + n].repeat_interleave(16, 1)
        assert np.array_equal(rows, expected[:, :20].numpy())
    stored = weight.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    model = jax_layers.Linear(
        jnp.asarray(stored), weight_scale=jnp.asarray(scale.numpy()), block=block
    )
    assert np.array_equal(np.asarray(model.dequantized(jnp.float32)), real.numpy())


def test_params_parse_and_the_scheme_is_checked():
    params = ARGS.to_dict()
    args = ModelArgs.from_dict(json.loads(json.dumps(params)))
    assert args.fp8_block == BLOCK and args == LARGE3  # storage, not the model: compares equal

    def refused(edit, message):
        config = block_fp8_config(BLOCK)
        edit(config)
        with pytest.raises(ValueError, match=message):
            ModelArgs.from_dict(params | {"quantization_config": config})

    group = lambda c: c["config_groups"]["group_0"]  # noqa: E731
    refused(lambda c: c.update(quant_method="fp8"), "quant_method 'fp8' is unsupported")
    refused(
        lambda c: group(c)["weights"].update(strategy="channel"),
        "weights.strategy 'channel' is unsupported",
    )
    refused(lambda c: group(c)["weights"].update(num_bits=4), "num_bits 4 is unsupported")
    refused(
        lambda c: group(c)["input_activations"].update(dynamic=False),
        "static input activation scales are unsupported",
    )
    refused(lambda c: c.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme is unsupported")
    refused(lambda c: c.update(colour="blue"), "unknown key.*colour")
    with pytest.raises(ValueError, match="both quantization and quantization_config"):
        ModelArgs.from_dict(params | {"quantization": {"qformat_weight": "fp8_e4m3"}})


@pytest.mark.parametrize(
    "edit, expect",
    [
        (
            lambda s: s.update({"layers.1.attention.wo.weight_scale": torch.ones(4, 8)}),
            "layers.1.attention.wo.weight_scale has shape [4, 8], expected [8, 4]",
        ),
        (
            lambda s: s.pop("layers.2.experts.3.w2.weight_scale"),
            "layers.2.experts.3.w2.weight is FP8 without its weight_scale",
        ),
    ],
    ids=["transposed-shape", "missing"],
)
def test_bad_block_scales_are_refused_in_one_line(tmp_path, edit, expect):
    state = block_state()
    edit(state)
    folder = write_tiny_checkpoint(
        tmp_path / "src", ARGS, state=state, weights_format="safetensors"
    )
    result = CliRunner().invoke(convert_cli, [str(folder), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_keep_copies_every_byte_and_both_models_match_on_it(source, tmp_path):
    out = tmp_path / "kept"
    convert_checkpoint(source, out)
    ours, theirs = open_folder(out).tensors, open_folder(source).tensors
    assert list(ours) == list(theirs)
    for name, record in theirs.items():
        assert ours[name].array().tobytes() == record.array().tobytes(), name
    roles = open_folder(out).roles
    assert len(roles.quantized) == len(quantized_names(block_state()))
    assert json.loads((out / "params.json").read_text())["quantization_config"]
    tokens = list(range(5, 70))
    with torch.no_grad():
        reference = reference_torch.Transformer.from_folder(source, dtype="float32")
        expected = reference(torch.tensor([tokens]))[0].numpy()
    port = model_jax.load_model(out, dtype="float32")
    assert port.layers.experts.w1.weight.dtype == jnp.float8_e4m3fn  # kept FP8 in memory
    assert port.layers.experts.w1.weight_scale.shape == (2, 8, 2, 6)  # 16×64 in 8×12 blocks
    got = np.asarray(port(jnp.asarray(tokens)))
    # Both dequantize in fp32 and run fp32: only summation order differs.
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantized_is_fp8_times_its_block_scale_rounded_once(
    source, tmp_path, monkeypatch, dtype
):
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", 700)  # a few rows per step, across blocks
    out = tmp_path / dtype
    convert_checkpoint(source, out, dtype=dtype)
    theirs, ours = load_file(source / "consolidated.safetensors"), open_folder(out).tensors
    assert not [n for n in ours if n.endswith("weight_scale")]
    assert "quantization_config" not in json.loads((out / "params.json").read_text())
    target = getattr(torch, dtype)
    for name in quantized_names(theirs):
        scale = theirs[name.removesuffix(".weight") + ".weight_scale"]
        expected = dequantize(theirs[name], scale, BLOCK).to(target)
        view = torch.int16 if dtype == "bfloat16" else torch.int32
        got = ours[name].array()
        got = got.view(np.uint16) if got.dtype == ml_dtypes.bfloat16 else got.view(np.uint32)
        assert got.tobytes() == expected.view(view).numpy().tobytes(), name


@pytest.fixture(scope="module")
def kept(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept") / "out"
    convert_checkpoint(source, out)
    return out


@pytest.mark.slow
def test_verify_passes_block_fp8_and_fails_scales_read_transposed(source, kept, patched):
    report = run_verification(source, kept, prompts=[PROMPT], stream_layers=True)
    assert report.verdict == "pass", report.reasons
    # The random router is flat: a few tokens sit on near-ties and are left out free-running
    # (with them in, this faithful port read 3.4× the reference's own bf16 error there).
    assert 0 < report.logits.rerouted < report.logits.metrics.tokens // 4

    def transposed(self):
        """The grid read as if stored columns first: [R, C] taken as [C, R], transposed."""
        rows, cols = self.weight_scale.shape[-2:]
        grid = self.weight_scale.reshape(*self.weight_scale.shape[:-2], cols, rows)
        self = dataclasses.replace(self, weight_scale=jnp.swapaxes(grid, -1, -2))
        return original(self)

    original = jax_layers.Linear._block_scales
    patched(jax_layers.Linear, "_block_scales", transposed)
    report = run_verification(source, kept, prompts=[PROMPT], stream_layers=True)
    assert report.verdict == "fail"
    assert report.failing_blocks == tuple(range(LARGE3.n_layers)), report.reasons[:4]
    for layer in report.layers:
        assert any(f.startswith("q_path") for f in layer.failures), layer.failures  # wq_b: FP8
        assert not any(f.startswith("kv_latent") for f in layer.failures)  # wkv_a_with_mqa: not
        ffn = "experts" if layer.index >= LARGE3.dense_layers else "feed_forward"
        assert any(f.startswith(ffn) for f in layer.failures), layer.failures
