"""Every member of the family (DESIGN.md §1) at tiny size: official folder → mistral-convert →
JAX model on the converted folder vs torch reference on the official one, fp32 to 1e-5."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_tokens, relative_error, tiny_args

import reference_torch
from checkpoint.args import MoeArgs
from convert.convert import convert_checkpoint
from model_jax import generate, load_model
from verify.run import run_verification

FAMILY = {  # name: (tiny args, source weights format)
    "7b-v0.1": (tiny_args(vocab_size=32000, sliding_window=8), "pth"),
    "7b-v0.2": (tiny_args(vocab_size=32000, rope_theta=1e6), "pth"),
    "7b-v0.3": (tiny_args(vocab_size=32768, rope_theta=1e6), "safetensors"),
    "nemo": (tiny_args(vocab_size=32768, head_dim=24, rope_theta=1e6), "safetensors"),
    "mixtral": (
        tiny_args(
            vocab_size=32000, rope_theta=1e6, moe=MoeArgs(num_experts=4, num_experts_per_tok=2)
        ),
        "pth",
    ),
}


@pytest.fixture(params=FAMILY, scope="module")
def member(request, make_checkpoint, tmp_path_factory):
    args, weights_format = FAMILY[request.param]
    source = make_checkpoint(args, weights_format=weights_format)
    out = tmp_path_factory.mktemp(request.param) / "converted"
    convert_checkpoint(source, out)
    return args, source, out


def test_converted_member_matches_reference_fp32(member):
    args, source, out = member
    tokens = random_tokens(24, args.vocab_size)
    ref = reference_torch.Transformer.from_folder(source, dtype=torch.float32)
    expected = ref(torch.from_numpy(tokens).long()[None])[0].numpy()
    port = load_model(out, dtype=jnp.float32)
    assert relative_error(np.asarray(port(jnp.asarray(tokens))), expected) <= 1e-5
    prompts = [tokens[:5].tolist(), tokens.tolist()]
    ours = generate(port, prompts, max_new_tokens=6)
    assert ours == reference_torch.generate(ref, prompts, max_new_tokens=6)[0]


def test_member_verifies(member):
    _, source, out = member
    result = run_verification(
        source, out, prompts=["Hello there, general Kenobi"], stream_layers=True
    )
    assert result.verdict == "pass", result.reasons
