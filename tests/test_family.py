"""Every folder layout of the text releases (docs/formats.md, "Supported checkpoints") at tiny size:
official folder → mistral-convert → the JAX model on the converted folder against the torch
reference on the official one (fp32, 1e-5) and against HF transformers on the `--format hf`
export (Ministral's per-layer windows through `layer_types`); greedy generation past every
window identical; verify passes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import random_tokens, relative_error, tiny_args

import reference_torch
from checkpoint.args import MoeArgs
from checkpoint.tokenizer import find_tokenizer
from convert.convert import convert_checkpoint
from model_jax import generate, load_model
from verify.run import run_verification

W = 8
FAMILY = {  # name: (tiny args, weights format, the tokenizer file its release ships)
    "7b-v0.1": (tiny_args(vocab_size=32000, sliding_window=W), "pth", "tokenizer.model"),
    "7b-v0.2": (tiny_args(vocab_size=32000, rope_theta=1e6), "pth", "tokenizer.model"),
    "7b-v0.3": (
        tiny_args(vocab_size=32768, rope_theta=1e6),
        "safetensors",
        "tokenizer.model.v3",
    ),
    "nemo": (
        tiny_args(vocab_size=131072, head_dim=24, rope_theta=1e6),
        "safetensors",
        "tekken.json",
    ),
    "mixtral": (
        tiny_args(
            vocab_size=32000, rope_theta=1e6, moe=MoeArgs(num_experts=4, num_experts_per_tok=2)
        ),
        "pth",
        "tokenizer.model",
    ),
    "ministral": (  # one full-attention layer, then three windowed ones
        tiny_args(vocab_size=131072, n_layers=4, sliding_window=[None, W, W, W], rope_theta=1e8),
        "safetensors",
        "tekken.json",
    ),
    "large-2": (  # split consolidated weights, as the 123B release
        tiny_args(vocab_size=32768, n_layers=3, rope_theta=1e6),
        "split-safetensors",
        "tokenizer.model.v3",
    ),
}


@pytest.fixture(params=FAMILY, scope="module")
def member(request, make_checkpoint, tmp_path_factory):
    args, weights_format, _ = FAMILY[request.param]
    source = make_checkpoint(args, weights_format=weights_format)
    out = tmp_path_factory.mktemp(request.param) / "converted"
    convert_checkpoint(source, out)
    return request.param, args, source, out


@pytest.mark.slow
def test_the_folder_carries_its_releases_tokenizer_and_the_conversion_keeps_it(member):
    name, _, source, out = member
    expected = FAMILY[name][2]
    assert find_tokenizer(source).name == expected == find_tokenizer(out).name


@pytest.mark.slow
def test_converted_member_matches_reference_fp32_and_generates_past_the_window(member):
    _, args, source, out = member
    tokens = random_tokens(3 * W, args.vocab_size)
    ref = reference_torch.Transformer.from_folder(source, dtype=torch.float32)
    expected = ref(torch.from_numpy(tokens).long()[None])[0].numpy()
    port = load_model(out, dtype=jnp.float32)
    assert relative_error(np.asarray(port(jnp.asarray(tokens))), expected) <= 1e-5
    prompts = [tokens[:5].tolist(), tokens.tolist()]
    ours = generate(port, prompts, max_new_tokens=2 * W)
    assert ours == reference_torch.generate(ref, prompts, max_new_tokens=2 * W)[0]


@pytest.mark.slow
def test_hf_transformers_computes_the_same_logits(member, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, args, source, out = member
    convert_checkpoint(source, tmp_path / "hf", layout="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokens = random_tokens(3 * W, args.vocab_size, seed=1)
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(tokens).long()[None]).logits[0].numpy()
    ours = np.asarray(load_model(out, dtype=jnp.float32)(jnp.asarray(tokens)))
    assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.slow
def test_member_verifies(member):
    _, _, source, out = member
    result = run_verification(
        source, out, prompts=["Hello there, general Kenobi, how are you?"], stream_layers=True
    )
    assert result.verdict == "pass", result.reasons
