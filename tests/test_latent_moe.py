"""Mistral Small 4 and Large 3 at tiny size: multi-head latent attention and fine-grained MoE
(dense-first layers, expert groups, routed_scale ≠ 1, a shared expert) in both models, equal to
HF transformers' `Mistral4ForCausalLM` past the original context; sparse experts and the latent
cache in generation; verify passes them and fails, in the right block and piece, the faults
such ports have; full-size specs with their published parameter counts."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mla_support import LARGE3, ORIGINAL, SMALL4, hf_mistral4
from safetensors.torch import load_file, save_file
from support import relative_error, tiny_args

import model_jax
import model_jax.latent as jax_latent
import model_jax.model as jax_model
import model_jax.moe as jax_moe
import reference_torch
from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError
from checkpoint.presets import PRESETS
from checkpoint.spec import tensor_spec
from checkpoint.tiny import random_state_dict, write_tiny_checkpoint
from convert.convert import convert_checkpoint
from model_jax.cache import KVCache
from verify.readings import hf_reading_logits, other_reading_applies
from verify.report import markdown
from verify.run import run_verification
from verify.runners import TorchRunner

CONFIGS = {"large3": LARGE3, "small4": SMALL4}
PROMPT = (
    "Latent attention keeps one small vector per token in the cache, and a router sends each "
    "token to a few experts: this sentence is long enough to pass the original context."
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, args in CONFIGS.items():
        root = tmp_path_factory.mktemp(name)
        write_tiny_checkpoint(
            root / "src", args, state=random_state_dict(args, seed=3), weights_format="safetensors"
        )
        convert_checkpoint(root / "src", root / "out")
        made[name] = (root / "src", root / "out")
    return made


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_both_models_match_hf_mistral4_past_the_original_context(folders, name):
    source, out = folders[name]
    args = CONFIGS[name]
    tokens = np.random.default_rng(4).integers(0, 5000, 3 * ORIGINAL).tolist()
    with torch.no_grad():
        hf = hf_mistral4(args, load_file(source / "consolidated.safetensors"))
        expected = hf(torch.tensor([tokens])).logits[0].numpy()
        reference = reference_torch.Transformer.from_folder(source, dtype="float32")
        ours = reference(torch.tensor([tokens]))[0].numpy()
    port = np.asarray(model_jax.load_model(out, dtype="float32")(jnp.asarray(tokens)))
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() / scale < 1e-5
    assert np.abs(port - expected).max() / scale < 1e-5


@pytest.mark.slow
def test_greedy_generation_with_the_latent_cache_equals_hf(folders):
    """Ragged batch, prefill in chunks shorter than the prompts, the latent cache."""
    source, out = folders["large3"]
    prompts = [[1, *range(100, 109)], [1, *range(200, 240)]]
    port = model_jax.load_model(out, dtype="float32")
    ours = model_jax.generate(port, prompts, max_new_tokens=8, chunk_size=16)
    hf = hf_mistral4(LARGE3, load_file(source / "consolidated.safetensors"))
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = hf.generate(
                torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0
            )
        assert generated == theirs[0, len(prompt) :].tolist()


def test_the_latent_cache_keeps_576_values_per_token_for_large3():
    """Large 3: kv_lora_rank 512 + rope 64, against 128 heads × (192 + 128) expanded (71×)."""
    args = PRESETS["large-3-675b"]
    cache = eqx.filter_eval_shape(KVCache.empty, args, 1, "bfloat16")
    per_token = sum(math.prod(x.shape[2:]) for x in (*cache.k, *cache.v))
    expanded = args.n_heads * (args.head_dim + args.v_head_dim)
    assert per_token == 576 and expanded == 40960 and expanded // per_token == 71


@pytest.mark.slow
def test_only_the_chosen_experts_are_computed():
    """The grouped matmul sees the token–expert pairs only: k per token, not every expert."""
    calls = []
    ragged_dot = jax.lax.ragged_dot

    def counting(lhs, rhs, sizes, **kw):
        calls.append(lhs.shape[0])
        return ragged_dot(lhs, rhs, sizes, **kw)

    experts = eqx.filter_vmap(lambda _: jax_model.FeedForward.zeros(SMALL4, jnp.float32, 16))(
        jnp.arange(8)
    )
    x = jnp.ones((5, SMALL4.dim))
    selected = jnp.array([[0, 3]] * 5)
    jax.lax.ragged_dot = counting
    try:
        jax_moe.sparse_mix(experts, x, jnp.full((5, 2), 0.5), selected)
    finally:
        jax.lax.ragged_dot = ragged_dot
    assert calls == [10, 10, 10]  # 5 tokens × 2 experts each, for w1, w3 and w2


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_verify_passes_both_and_judges_every_declared_piece(folders, stream):
    for name in CONFIGS:
        source, out = folders[name]
        report = run_verification(
            source, out, prompts=[PROMPT], stream_layers=stream, max_new_tokens=4
        )
        assert report.verdict == "pass", report.reasons
        routed = report.layers[-1]
        names = [p.piece for p in routed.pieces]
        assert names[:4] == ["attention_norm", "q_path", "kv_latent", "attention"]
        assert {"router", "experts", "shared_experts"} <= set(names)
        router = next(p for p in routed.pieces if p.piece == "router")
        assert router.integer_unexplained_bf16 == 0 and router.integer_tokens > 0


@pytest.mark.slow
def test_verify_with_the_hf_peer_passes_clean(folders):
    """The peer is transformers' Mistral4ForCausalLM on the `--format hf` export."""
    source, out = folders["large3"]
    report = run_verification(source, out, prompts=[PROMPT], stream_layers=True, peer="hf")
    assert report.verdict == "pass" and report.peer == "hf", report.reasons
    assert report.logits.peer.fp32_error <= 1e-5
    blocks = [e for e in report.layers if e.peer_fp32_error is not None]
    assert len(blocks) == LARGE3.n_layers - 1  # the peer's last block output comes normed
    assert all(e.peer_fp32_error <= 1e-5 for e in blocks)


def test_the_other_reading_is_shown_only_where_the_readings_differ():
    """Latent attention with YaRN (factor > 1) and apply_scale false; not with apply_scale
    true, without YaRN, or for grouped-query attention."""
    apply_scale = dataclasses.replace(LARGE3.yarn, apply_scale=True)
    assert other_reading_applies(LARGE3) and other_reading_applies(SMALL4)
    assert not other_reading_applies(dataclasses.replace(LARGE3, yarn=apply_scale))
    assert not other_reading_applies(dataclasses.replace(LARGE3, yarn=None))
    dense = tiny_args(yarn=LARGE3.yarn, max_position_embeddings=LARGE3.max_position_embeddings)
    assert not dense.latent and not other_reading_applies(dense)


@pytest.mark.slow
def test_the_other_reading_is_hf_mistral4s_with_its_own_mscale_all_dim(folders):
    """The reference under HF's reading equals transformers' Mistral4 with mscale_all_dim 1
    (its configs' value), and differs from ours past the original context."""
    source, _ = folders["large3"]
    tokens = np.random.default_rng(4).integers(0, 5000, 3 * ORIGINAL).tolist()
    (moved,) = hf_reading_logits(TorchRunner(source, "cpu"), [tokens], [0])
    state = load_file(source / "consolidated.safetensors")
    with torch.no_grad():
        theirs = hf_mistral4(LARGE3, state, mscale_all_dim=1.0)(torch.tensor([tokens]))
        ours = hf_mistral4(LARGE3, state)(torch.tensor([tokens]))
    assert relative_error(moved, theirs.logits[0].numpy()) < 1e-5
    assert relative_error(moved, ours.logits[0].numpy()) > 1e-3


@pytest.mark.slow
def test_verify_reports_the_other_readings_effect_without_judging_it(folders):
    source, out = folders["large3"]
    report = run_verification(source, out, prompts=[PROMPT], stream_layers=True)
    other = report.logits.other_reading
    assert report.verdict == "pass", report.reasons
    assert other.softmax_factor == pytest.approx((0.1 * math.log(8.0) + 1) ** 2)
    assert other.error > 0 and other.ratio > 0 and other.noise_dtype == "bfloat16"
    assert "Other reading (not judged)" in markdown(report)


def rope_on_the_nope_part(patch):
    queries = jax_latent.LatentAttention.queries

    def wrong(self, x, rope, positions):
        q = queries(self, x, rope, positions)
        nope = jax_latent.apply_rotary(q[..., : self.rope], *rope)  # the first dims rotated
        return jnp.concatenate([nope, q[..., self.rope :]], axis=-1)

    patch(jax_latent.LatentAttention, "queries", wrong)


def k_rope_not_shared(patch):
    """Each head reads its own rotation of the rope key instead of the one shared key."""

    def wrong(self, q, kv_latent, k_rope, positions, cached=None):
        S = kv_latent.shape[0]
        kv = self.wkv_b(kv_latent).reshape(S, self.n_heads, self.nope + self.v_dim)
        k_nope, values = kv[..., : self.nope], kv[..., self.nope :]
        per_head = jnp.stack([jnp.roll(k_rope, h, axis=-1) for h in range(self.n_heads)], 1)
        keys = jnp.concatenate([k_nope, per_head], axis=-1)
        scores = jnp.einsum("thd,shd->hts", q, keys).astype(jnp.float32) * self.scale
        visible = positions[None, :] <= positions[:, None]
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), -1).astype(q.dtype)
        out = jnp.einsum("hts,shd->thd", probs, values)
        return self.wo(out.reshape(q.shape[0], -1))

    patch(jax_latent.LatentAttention, "attend", wrong)


def no_renormalisation(patch):
    route = jax_moe.fine_grained_route

    def wrong(logits, moe):
        _, selected, scores = route(logits, moe)
        return jnp.take_along_axis(scores, selected, -1) * moe.routed_scale, selected, scores

    patch(jax_model, "fine_grained_route", wrong)


def shared_expert_dropped(patch):
    patch(jax_model.TransformerBlock, "shared", lambda self, x: jnp.zeros_like(x))


CODE_FAULTS = {
    "rope-on-the-nope-part": (rope_on_the_nope_part, "q_path"),
    "k-rope-not-shared": (k_rope_not_shared, "attention"),
    "routing-not-renormalised": (no_renormalisation, "router"),
    "shared-expert-dropped": (shared_expert_dropped, "shared_experts"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", CODE_FAULTS)
def test_code_faults_fail_in_their_piece(folders, patched, fault):
    inject, piece = CODE_FAULTS[fault]
    inject(patched)
    source, out = folders["large3"]
    report = run_verification(source, out, prompts=[PROMPT], stream_layers=True)
    assert report.verdict == "fail"
    routed_only = piece in ("router", "shared_experts")
    expected = tuple(range(LARGE3.dense_layers if routed_only else 0, LARGE3.n_layers))
    assert report.failing_blocks == expected, report.reasons[:4]
    for i in expected:
        assert any(f.startswith(piece) for f in report.layers[i].failures), report.layers[
            i
        ].failures


@pytest.mark.slow
def test_one_experts_w1_and_w3_swapped_fails_that_block(folders, tmp_path):
    source, _ = folders["large3"]
    state = load_file(source / "consolidated.safetensors")
    prefix = "layers.2.experts.5."
    state[prefix + "w1.weight"], state[prefix + "w3.weight"] = (
        state[prefix + "w3.weight"].clone(),
        state[prefix + "w1.weight"].clone(),
    )
    faulty = tmp_path / "faulty"
    faulty.mkdir()
    for name in ("params.json", "tekken.json"):
        (faulty / name).write_bytes((source / name).read_bytes())
    save_file(state, faulty / "consolidated.safetensors")
    convert_checkpoint(faulty, tmp_path / "out")
    report = run_verification(source, tmp_path / "out", prompts=[PROMPT], stream_layers=True)
    assert report.verdict == "fail" and report.failing_blocks == (2,), report.reasons[:4]
    assert any(f.startswith("experts") for f in report.layers[2].failures)


def test_large3_and_small4_specs_have_their_published_parameter_counts():
    """Large 3: 673B in the language model, 39B active; Small 4: 119B, ~6.5B active (with
    embeddings and head; the launch post rounds to 6B without them)."""
    for name, total, active, tolerance in (
        ("large-3-675b", 673e9, 39e9, 1.5e9),
        ("small-4-119b", 119e9, 6.5e9, 0.5e9),
    ):
        args = PRESETS[name]
        spec = tensor_spec(args)
        count = sum(math.prod(s) for s in spec.values())
        routed = sum(math.prod(s) for n, s in spec.items() if ".experts." in n)
        moe = args.moe
        assert abs(count - total) < 0.01 * total, f"{count:,}"
        on = count - routed + routed * moe.num_experts_per_tok // moe.num_experts
        assert abs(on - active) < tolerance, f"{on:,}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q_lora_rank": None}, "null q_lora_rank"),
        ({"no_rope_layers": [1, 1, 0]}, "Mistral Large 4"),
        ({"index_topk": 2048}, "sparse-attention indexer"),
        (
            {"quantization_config": {"quant_method": "awq", "config_groups": {}}},
            "quant_method 'awq' is unsupported",
        ),
        (
            {
                "moe": {
                    "num_experts": 8,
                    "num_experts_per_tok": 2,
                    "num_shared_experts": 1,
                    "expert_hidden_dim": 16,
                    "route_every_n": 2,
                }
            },
            "route_every_n 2 is unsupported",
        ),
        (
            {
                "moe": {
                    "num_experts": 8,
                    "num_experts_per_tok": 2,
                    "num_shared_experts": 1,
                    "expert_hidden_dim": 16,
                    "renorm_strategy": "WEIGHTS",
                }
            },
            "unknown key.*renorm_strategy",
        ),
        ({"n_kv_heads": 2}, "n_kv_heads = n_heads"),
    ],
)
def test_latent_and_moe_keys_are_refused_by_name(change, message):
    params = LARGE3.to_dict() | change
    params = {k: v for k, v in params.items() if v is not None or k == "q_lora_rank"}
    with pytest.raises((ValueError, CheckpointError), match=message):
        ModelArgs.from_dict(params)
