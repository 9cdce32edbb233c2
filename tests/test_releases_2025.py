"""The dense releases of 2025–26 in both models: a Ministral-3-shaped folder (FP8 weights with
every scale shape, YaRN, Llama-4 scaling, tied embeddings, a vision encoder beside the text
decoder) and a Mistral-Small-3.1-shaped one (vision, tekken, head_dim ≠ dim / n_heads) match
HF transformers' `Ministral3ForCausalLM` built from the same numbers, past the original
context; verify passes them and fails the faults that bite only far out or only on FP8."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file
from support import hf_rope_parameters, relative_error, tiny_args

import model_jax
import model_jax.attention as jax_attention
import model_jax.cli as generate_cli
import model_jax.model as jax_model
import reference_torch
from checkpoint.hf_names import interleaved_to_halves
from checkpoint.sections import Llama4ScalingArgs, QuantizationArgs, YarnArgs
from checkpoint.tensors import TensorRecord
from checkpoint.tiny import (
    TINY_VISION_ENCODER,
    quantize_fp8,
    random_state_dict,
    vision_state,
    write_tiny_checkpoint,
)
from convert.convert import convert_checkpoint
from model_jax.cache import KVCache
from model_jax.loading import skeleton
from reference_torch.loading import dequantize
from verify.run import run_verification

ORIGINAL = 32  # the original context of the tiny configs: prompts of 100 tokens reach past it
MINISTRAL3 = tiny_args(
    n_layers=3,
    head_dim=32,
    vocab_size=131072,
    rope_theta=1e6,
    yarn=YarnArgs(factor=16.0, original_max_position_embeddings=ORIGINAL, apply_scale=False),
    llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=ORIGINAL, beta=0.1),
    max_position_embeddings=512,  # factor × original, as Ministral 3's 16 × 16384
    tied_embeddings=True,
    quantization=QuantizationArgs("fp8_e4m3", "TENSOR"),
    vision_encoder=TINY_VISION_ENCODER,
)
SMALL31 = tiny_args(
    n_layers=2, head_dim=32, vocab_size=131072, rope_theta=1e9, vision_encoder=TINY_VISION_ENCODER
)
PROMPTS = [
    "Bonjour",
    "A prompt long enough to reach well past the original context of the tiny configuration "
    "so that YaRN's interpolated frequencies and the Llama-4 query scaling both act on it.",
]


def ministral3_state(args, seed=0):
    """Random weights, FP8 in every block with each scale shape: [1], 0-d, one per row."""
    state = random_state_dict(args, seed=seed) | vision_state(args, seed=seed)
    linears = [n for n in state if n.startswith("layers.") and state[n].ndim == 2]
    scalar = [n for n in linears if ".wk." in n or ".w2." in n]
    per_row = [n for n in linears if ".wv." in n]
    state = quantize_fp8(state, [n for n in linears if n not in scalar + per_row])
    state = quantize_fp8(state, scalar, scalar=True)
    return quantize_fp8(state, per_row, per_row=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, args, state in (
        ("ministral3", MINISTRAL3, ministral3_state(MINISTRAL3)),
        ("small31", SMALL31, random_state_dict(SMALL31) | vision_state(SMALL31)),
    ):
        root = tmp_path_factory.mktemp(name)
        write_tiny_checkpoint(root / "src", args, state=state, weights_format="safetensors")
        convert_checkpoint(root / "src", root / "out")
        made[name] = (root / "src", root / "out")
    return made


def saved(folder) -> dict[str, torch.Tensor]:
    """The tensors as the folder stores them (bf16, FP8 and float32 scales)."""
    return load_file(folder / "consolidated.safetensors")


def hf_model(args, state) -> torch.nn.Module:
    """HF's Ministral3 text model from the same numbers: FP8 dequantized as the reference
    does, wq/wk rows in rotate-half order, YaRN's attention factor given explicitly."""
    rope = hf_rope_parameters(args, attention_factor=args.yarn and args.yarn.attention_factor)
    # HF always applies Llama-4 scaling (β = 0: none), with the rope parameters' length.
    scaling = args.llama_4_scaling or Llama4ScalingArgs(args.max_position_embeddings or 4096, 0)
    rope["llama_4_scaling_beta"] = scaling.beta
    rope.setdefault("original_max_position_embeddings", scaling.original_max_position_embeddings)
    config = transformers.Ministral3Config(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_position_embeddings or 4096,
        tie_word_embeddings=args.tied_embeddings,
        rope_parameters=rope,
    )
    model = transformers.Ministral3ForCausalLM(config).eval()
    names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    names |= {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"]}
    hf["model.norm.weight"] = state["norm.weight"]
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
        for short, long in names.items():
            part = "attention" if short.startswith("w") and short[1] in "qkvo" else "feed_forward"
            weight = state[f"{p}{part}.{short}.weight"]
            scale = state.get(f"{p}{part}.{short}.qscale_weight")
            weight = weight.float() if scale is None else dequantize(weight, scale)
            if short in ("wq", "wk"):
                heads = args.n_heads if short == "wq" else args.n_kv_heads
                weight = torch.from_numpy(interleaved_to_halves(weight.numpy(), heads))
            sub = "self_attn" if part == "attention" else "mlp"
            hf[f"{q}{sub}.{long}.weight"] = weight
    if not args.tied_embeddings:
        hf["lm_head.weight"] = state["output.weight"]
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def logits(name, folders, tokens):
    source, out = folders[name]
    ref = reference_torch.Transformer.from_folder(source, dtype="float32")
    port = model_jax.load_model(out, dtype="float32")
    with torch.no_grad():
        reference = ref(torch.tensor([tokens]))[0].numpy()
    return reference, np.asarray(port(jax.numpy.asarray(tokens)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "apply_scale", [False, True], ids=["yarn-no-magnitude", "yarn-with-magnitude"]
)
def test_ministral3_matches_hf_past_the_original_context(tmp_path, apply_scale):
    args = dataclasses.replace(
        MINISTRAL3, yarn=dataclasses.replace(MINISTRAL3.yarn, apply_scale=apply_scale)
    )
    write_tiny_checkpoint(
        tmp_path / "src", args, state=ministral3_state(args), weights_format="safetensors"
    )
    state = saved(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out")
    tokens = np.random.default_rng(1).integers(0, 5000, 3 * ORIGINAL).tolist()
    with torch.no_grad():
        expected = hf_model(args, state)(torch.tensor([tokens])).logits[0].numpy()
    reference, port = logits("x", {"x": (tmp_path / "src", tmp_path / "out")}, tokens)
    scale = np.abs(expected).max()
    assert np.abs(reference - expected).max() / scale < 1e-5
    assert np.abs(port - expected).max() / scale < 1e-5


@pytest.mark.slow
def test_small31_matches_hf(folders):
    tokens = np.random.default_rng(2).integers(0, 5000, 50).tolist()
    args, state = SMALL31, saved(folders["small31"][0])
    with torch.no_grad():
        expected = hf_model(args, state)(torch.tensor([tokens])).logits[0].numpy()
    reference, port = logits("small31", folders, tokens)
    scale = np.abs(expected).max()
    assert np.abs(reference - expected).max() / scale < 1e-5
    assert np.abs(port - expected).max() / scale < 1e-5


def test_the_jax_model_keeps_fp8_weights_in_memory_and_one_embedding_table(folders):
    _, out = folders["ministral3"]
    model = model_jax.load_model(out)
    assert model.layers.attention.wq.weight.dtype == jax.numpy.float8_e4m3fn
    kv_rows = MINISTRAL3.n_kv_heads * MINISTRAL3.head_dim  # one scale per row of wv
    assert model.layers.attention.wv.qscale_weight.shape == (MINISTRAL3.n_layers, kv_rows)
    assert model.output is None  # tied: the head reads tok_embeddings
    fp8 = sum(x.nbytes for x in jax.tree.leaves(model.layers))
    bf16 = sum(x.size * 2 for x in jax.tree.leaves(skeleton(MINISTRAL3, "bfloat16").layers))
    assert fp8 < 0.6 * bf16


@pytest.mark.slow
def test_ministral3_cached_decode_equals_the_reference_past_the_original_context(folders):
    """Decoding one token a step from the cache (YaRN, the Llama-4 query scale of each new
    position, FP8, tied head) gives the reference's full-forward logits, past the original
    context; and generation, end to end, the reference's and HF's greedy tokens. (Greedy
    tokens alone would not do: random weights' logits are so peaked that dropping the query
    scale keeps them.)"""
    source, out = folders["ministral3"]
    tokens = np.random.default_rng(3).integers(0, 5000, 3 * ORIGINAL).tolist()
    ref = reference_torch.Transformer.from_folder(source, dtype="float32")
    port = model_jax.load_model(out, dtype="float32")
    with torch.no_grad():
        expected = ref(torch.tensor([tokens]))[0].numpy()
    cache = KVCache.empty(port.args, len(tokens), dtype=jax.numpy.float32)
    decoded = []
    for start, end in [(0, 5), *((p, p + 1) for p in range(5, len(tokens)))]:
        chunk = jax.numpy.asarray(tokens[start:end])
        logits, cache = port.step(chunk, jax.numpy.arange(start, end), cache)
        decoded.append(np.asarray(logits))
    assert relative_error(np.concatenate(decoded), expected) <= 1e-5
    prompts = [tokens[:3], tokens[:40]]
    ours = model_jax.generate(port, prompts, max_new_tokens=ORIGINAL)
    assert ours == reference_torch.generate(ref, prompts, max_new_tokens=ORIGINAL)[0]
    hf = hf_model(MINISTRAL3, saved(source))
    for prompt, new in zip(prompts, ours, strict=True):
        with torch.no_grad():
            greedy = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=ORIGINAL,
                min_new_tokens=ORIGINAL,
                do_sample=False,
                pad_token_id=0,
            )
        assert greedy[0, len(prompt) :].tolist() == new


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_verify_passes_both_layouts_and_says_what_it_did_not_verify(folders, stream):
    for name in ("ministral3", "small31"):
        source, out = folders[name]
        report = run_verification(
            source, out, prompts=PROMPTS, stream_layers=stream, max_new_tokens=4
        )
        assert report.verdict == "pass", report.reasons
        assert any("vision encoder: carried, not verified" in n for n in report.notes)
    probes = [p for p in report.prompts if p.kind == "probe"]
    assert not probes  # Small 3.1 has no long-context scaling: nothing to probe
    source, out = folders["ministral3"]
    report = run_verification(source, out, prompts=PROMPTS[:1], stream_layers=True)
    probes = [p for p in report.prompts if p.kind == "probe"]
    assert probes and max(p.tokens for p in probes) > 0
    assert any("YaRN" in n for n in report.notes) and any("FP8" in n for n in report.notes)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["llama-4-scaling-dropped", "yarn-factor-ignored"])
def test_faults_that_bite_only_far_out_fail_every_block(folders, patched, fault):
    if fault == "llama-4-scaling-dropped":
        patched(jax_attention, "llama_4_scaled", lambda q, positions, scaling: q)
    else:  # plain RoPE frequencies and magnitude
        rotary = jax_model.rotary_angles
        patched(
            jax_model,
            "rotary_angles",
            lambda positions, args: rotary(positions, dataclasses.replace(args, yarn=None)),
        )
    source, out = folders["ministral3"]
    report = run_verification(source, out, prompts=PROMPTS[:1], stream_layers=True)
    assert report.verdict == "fail"
    assert report.failing_blocks == tuple(range(MINISTRAL3.n_layers)), report.reasons[:4]
    assert any(f.startswith("qkv") for f in report.layers[0].failures)


@pytest.mark.slow
def test_one_ignored_fp8_scale_fails_that_block(folders, monkeypatch):
    """A port reader that drops one linear's qscale_weight (reads it as 1)."""
    array = TensorRecord.array

    def buggy(self):
        data = array(self)
        return np.ones_like(data) if self.name == "layers.1.attention.wk.qscale_weight" else data

    monkeypatch.setattr(TensorRecord, "array", buggy)
    source, out = folders["ministral3"]
    report = run_verification(source, out, prompts=PROMPTS, stream_layers=True)
    assert report.verdict == "fail" and report.failing_blocks == (1,), report.reasons[:4]
    assert any(f.startswith("qkv") for f in report.layers[1].failures)


@pytest.mark.slow
def test_a_tied_head_read_from_another_tensor_fails_the_logits(folders, patched):
    head = jax_model.Transformer.head

    def wrong(self, h):  # the head reads the embedding table's rows in reverse order
        swapped = eqx.tree_at(
            lambda m: m.tok_embeddings.weight, self, self.tok_embeddings.weight[::-1]
        )
        return head(swapped, h)

    patched(jax_model.Transformer, "head", wrong)
    source, out = folders["ministral3"]
    report = run_verification(source, out, prompts=PROMPTS, stream_layers=True)
    assert report.verdict == "fail" and not report.failing_blocks
    assert any(r.startswith("logits") for r in report.reasons), report.reasons[:4]


@pytest.mark.slow
def test_positions_past_max_position_embeddings_are_refused(folders):
    source, out = folders["ministral3"]
    too_long = " ".join(["word"] * 600)
    with pytest.raises(ValueError, match="past max_position_embeddings 512"):
        run_verification(source, out, prompts=[too_long], stream_layers=True)
    port = model_jax.load_model(out)
    with pytest.raises(ValueError, match="position 512, past max_position_embeddings 512"):
        model_jax.generate(port, [[1] * 500], max_new_tokens=13)
    model_jax.generate(port, [[1] * 500], max_new_tokens=12)  # the last position: 511
    generated = CliRunner().invoke(generate_cli.main, [str(out), "--prompt", too_long])
    assert generated.exit_code == 2 and generated.stdout == ""
    assert generated.stderr.startswith("error: prompt 1: ") and "params.json" in generated.stderr
    assert len(generated.stderr.strip().splitlines()) == 1
