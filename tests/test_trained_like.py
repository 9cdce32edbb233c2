"""Trained-like weights behave like a trained model: after block 1 a few channels of the first
token are hundreds of times the rest (with or without BOS, any prompt length), and later heads
attend to that token (attention sinks)."""

import dataclasses

import pytest
import torch
from gate_cases import CONFIGS, prompts

from checkpoint.tiny import TINY_ARGS
from checkpoint.trained_like import MASSIVE, check_supported, trained_like_state_dict
from reference_torch.model import Transformer
from reference_torch.rope import apply_rotary_emb


def model_of(args, seed):
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(trained_like_state_dict(args, seed=seed), strict=True, assign=True)
    return model.eval()


def attention_to_first_token(model, hidden, block: int) -> float:
    """Mean attention weight queries 1…T-1 put on token 0, over heads (fp32)."""
    layer = model.layers[block]
    attention, x = layer.attention, layer.attention_norm(hidden[block])
    T = x.shape[1]
    cis = model.rotary(torch.arange(T))
    q = apply_rotary_emb(attention.wq(x).view(1, T, attention.n_heads, -1), cis)
    k = apply_rotary_emb(attention.wk(x).view(1, T, attention.n_kv_heads, -1), cis)
    k = k.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * attention.scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return float(scores.softmax(-1)[0, :, 1:, 0].mean())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("args", [CONFIGS["trained-like"].args, TINY_ARGS], ids=["table", "demo"])
@torch.inference_mode()
def test_massive_activations_at_the_first_token_and_sinks_after(args, seed):
    model = model_of(args, seed)
    for prompt in prompts():
        _, hidden = model.forward_hidden(torch.tensor([list(prompt.tokens)]))
        for k in range(2, args.n_layers + 1):  # after block 1, every block's output
            h = hidden[k][0]
            first, median = h[0].abs().max(), h.abs().median()
            assert 100 <= first / median <= 2000, (prompt.text[:20], k, float(first / median))
            assert int(h[0].abs().argmax()) in MASSIVE
            if len(prompt.tokens) > 1:  # later tokens stay O(1)-ish in the massive channels
                assert h[1:, list(MASSIVE)].abs().max() < first / 20
        if 1 < len(prompt.tokens) <= 64:
            assert attention_to_first_token(model, hidden, 2) > 0.5


def test_configs_the_mechanism_cannot_carry_are_refused():
    with pytest.raises(ValueError, match="head_dim ≥ 32"):
        check_supported(dataclasses.replace(TINY_ARGS, head_dim=16))
