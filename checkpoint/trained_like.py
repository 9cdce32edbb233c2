"""Random weights that behave like a trained model: massive activations and attention sinks.

Trained LLMs put a few residual channels of the first token at |h| ≈ 100–1000 after the first
blocks while everything else stays O(1), and later heads park attention on that token (Sun et
al. 2024, "Massive Activations in Large Language Models"; Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks"). Random weights never do, so gates tuned on them are
tuned on the wrong distribution (docs/verification.md, "Calibration"). This module wires that
behaviour into the random init of `checkpoint.tiny`, with or without BOS, from the position alone:

- block 0, attention: query head A attends to itself (q = β·k), head B uniformly (q = 0); both
  read the same values, and `wo` writes A − B into the D channels. At the first token both heads
  see only that token, so D is exactly 0 there; later it is v_t − mean(v) ≠ 0.
- block 0, FFN: unit pairs silu(±x)·(±x) sum to x², so channel C1 receives ‖D‖²: 0 at the first
  token, ≥ 1 after it.
- block 1, FFN: one unit silu(G·(θ·C0 − C1))·C0, with C0 a constant channel every embedding
  carries, fires only where C1 ≈ 0 and writes ≈ 500 into MASSIVE[0] and ≈ −250 into MASSIVE[1].
- blocks ≥ 2, attention: the slowest RoPE pair of every query reads C0 and of every key reads
  MASSIVE[0], so every query attends strongly to the first token (its value reads nothing from
  the massive channels: a sink, as in trained models).
- delimiters ("." "," and newline of the bundled tokenizer): their embedding carries a marker
  channel; block 1's FFN writes ≈ 600 into a channel of their own there (massive activations on
  the first delimiter tokens, as in trained models), and a late block's FFN erases it again
  (`erasing_block`), leaving a remainder of a few percent: a catastrophic cancellation that
  two bf16 implementations round apart on that one token.
- `flat=True`: the output head's rows come in near-identical pairs (1 % apart), so the top two
  next-token candidates are near-ties that rounding alone flips — the reference's own fp32 run
  agrees with its bf16 continuation on only ~70 % of tokens, as with flat distributions.

The random parts of every block never write the reserved channels, so the mechanism is exact.
"""

import torch

from checkpoint.args import ModelArgs
from checkpoint.tiny import random_state_dict

C0 = 0  # constant in every embedding (a bias direction after RMSNorm)
C1 = 1  # ‖D‖²: zero at the first token only
MASSIVE = (2, 3)  # the massive-activation channels
D_START = 4  # D channels: D_START … D_START + n_d - 1
EMBEDDING_C0 = 2.0
MASSIVE_GAIN = 100.0  # total w2 weight of the firing units; each outputs ≈ 5 at the first token
FIRING = 8  # block-1 units that write the massive channels
SINK_GAIN = 2.5  # q and k weight of the slowest RoPE pair (score bonus ≈ 8 on the first token)
EMBEDDING_DELIMITER = 2.0  # the marker channel of delimiter tokens
ERASED_REMAINDER = 0.05  # the erasing block leaves this fraction of the delimiter's activation
FLAT_PAIR_SPREAD = 0.01  # `flat`: paired head rows differ by this relative amount
DELIMITERS = (".", ",", "\n")
# The short prompt whose delimiter (token 2, after BOS) the eraser is calibrated on.
CALIBRATION_TEXT = "Yes. The capital of France is"


def d_channels(args: ModelArgs) -> int:
    """How many channels carry D (bounded by head_dim, dim and hidden_dim)."""
    return min(16, args.head_dim, args.dim // 4, (args.hidden_dim - 1) // 2)


def check_supported(args: ModelArgs) -> None:
    if args.moe is not None:
        raise ValueError("trained-like weights are built for dense models (moe is set)")
    if args.n_layers < 3 or args.n_heads < 2 or args.head_dim < 32 or args.dim < 64:
        # head_dim ≥ 32: head A's own key must beat ~700 random keys by a wide margin.
        raise ValueError(
            "trained-like weights need n_layers ≥ 3, n_heads ≥ 2, head_dim ≥ 32 and dim ≥ 64"
        )


def delimiter_channels(args: ModelArgs) -> tuple[int, int]:
    """(marker, massive) channels of delimiter tokens, after the D channels."""
    first = D_START + d_channels(args)
    return first, first + 1


def erasing_block(args: ModelArgs) -> int:
    """The late block whose FFN erases the delimiters' massive activation."""
    return max(2, args.n_layers - 2)


def delimiter_ids(vocab_size: int) -> list[int]:
    """Ids of ".", "," and newline in the bundled tokenizer of this vocabulary (none without
    one)."""
    from checkpoint.tiny import bundled_tokenizer
    from checkpoint.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer(bundled_tokenizer(vocab_size))
    except ValueError:
        return []
    ids = tokenizer.encode("a. b, c\nd", bos=False)
    return sorted({i for i in ids if tokenizer.decode([i]) in DELIMITERS})


def trained_like_state_dict(
    args: ModelArgs, *, seed: int = 0, flat: bool = False
) -> dict[str, torch.Tensor]:
    """fp32 weights: `checkpoint.tiny.random_state_dict` with the mechanism above wired in."""
    check_supported(args)
    state = random_state_dict(args, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7919)
    n_d = d_channels(args)
    d = list(range(D_START, D_START + n_d))
    marker, delimiter_massive = delimiter_channels(args)
    reserved = [C0, C1, *MASSIVE, *d, marker, delimiter_massive]
    # Nothing random writes these; the massive channels get a little.
    mechanism = [C0, C1, *d, marker, delimiter_massive]
    embeddings = state["tok_embeddings.weight"]
    embeddings[:, reserved] = 0.0
    embeddings[:, C0] = EMBEDDING_C0
    embeddings[delimiter_ids(args.vocab_size), marker] = EMBEDDING_DELIMITER
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state[p + "attention.wo.weight"][mechanism] = 0.0
        state[p + "feed_forward.w2.weight"][mechanism] = 0.0
        state[p + "attention_norm.weight"][reserved] = 1.0
        state[p + "ffn_norm.weight"][reserved] = 1.0
        if i >= 2:  # later blocks ignore the massive channels (their input is ≈ one-hot there)
            state[p + "feed_forward.w1.weight"][:, [*MASSIVE, delimiter_massive]] = 0.0
            state[p + "feed_forward.w3.weight"][:, [*MASSIVE, delimiter_massive]] = 0.0
            for w in ("wq", "wk", "wv"):
                state[p + f"attention.{w}.weight"][:, delimiter_massive] = 0.0
    _first_token_detector(state, args, d, reserved, gen)
    _squared_norm(state, d)
    _massive_unit(state, args, gen)
    _delimiter_unit(state, args, gen)
    for i in range(2, args.n_layers):
        _attention_sink(state, args, i, gen)
    _eraser(state, args)
    if flat:
        _near_tie_pairs(state, gen)
    return state


def _near_tie_pairs(state, gen) -> None:
    """Every odd row of the head a 1 % perturbation of the even row before it."""
    head = state.get("output.weight", state["tok_embeddings.weight"])
    noise = torch.randn(head[1::2].shape, generator=gen)
    head[1::2] = head[0::2] * (1 + FLAT_PAIR_SPREAD * noise)


def _first_token_detector(state, args: ModelArgs, d, reserved, gen) -> None:
    """Block 0: head A (self) minus head B (uniform) into the D channels."""
    hd, rep = args.head_dim, args.n_heads // args.n_kv_heads
    p = "layers.0.attention."
    wq, wk, wv, wo = (state[p + f"{w}.weight"] for w in ("wq", "wk", "wv", "wo"))
    wk[:hd, reserved] = 0.0  # keys from the token's content only
    wq[:hd] = 3.0 * wk[:hd]  # head A: q = 3k, so its own key wins by a wide margin
    wq[hd : 2 * hd] = 0.0  # head B: equal scores, a uniform average
    values = torch.randn(len(d), args.dim, generator=gen) / args.dim**0.5
    values[:, reserved] = 0.0
    wv[:hd] = 0.0
    wv[: len(d)] = values
    kv_b = 1 // rep  # head B's key/value head: 0 under GQA, 1 under MHA
    wv[kv_b * hd : (kv_b + 1) * hd] = wv[:hd]
    wo[:, : 2 * hd] = 0.0
    for j, channel in enumerate(d):
        wo[channel, j], wo[channel, hd + j] = 1.0, -1.0


def _squared_norm(state, d) -> None:
    """Block 0 FFN: silu(x)·x + silu(−x)·(−x) = x², summed over the D channels into C1."""
    p = "layers.0.feed_forward."
    w1, w2, w3 = (state[p + f"{w}.weight"] for w in ("w1", "w2", "w3"))
    units = 2 * len(d)
    w1[:units], w3[:units], w2[:, :units] = 0.0, 0.0, 0.0
    for j, channel in enumerate(d):
        for sign, unit in ((1.0, 2 * j), (-1.0, 2 * j + 1)):
            w1[unit, channel] = w3[unit, channel] = sign
            w2[C1, unit] = 1.0


def _massive_unit(state, args: ModelArgs, gen) -> None:
    """Block 1 FFN: units 0…FIRING-1 fire where C1 ≈ 0 (the first token) and write the massive
    channels. Their inputs carry a little of every channel, so the massive value is a sum over
    many rounded terms, as in a trained model (two bf16 implementations then round it apart)."""
    p = "layers.1.feed_forward."
    w1, w2, w3 = (state[p + f"{w}.weight"] for w in ("w1", "w2", "w3"))
    units = slice(0, FIRING)
    noise = 0.1 / args.dim**0.5
    w1[units] = noise * torch.randn(FIRING, args.dim, generator=gen)
    w3[units] = noise * torch.randn(FIRING, args.dim, generator=gen)
    w1[units, C0] += 4.0  # G·(θ·C0 − C1), G = 8, θ = 0.5
    w1[units, C1] += -8.0
    w3[units, C0] += 1.0
    share = (1 + 0.2 * torch.randn(FIRING, generator=gen)) * MASSIVE_GAIN / FIRING
    w2[MASSIVE[0], units] = share
    w2[MASSIVE[1], units] = -share / 2


def _attention_sink(state, args: ModelArgs, block: int, gen) -> None:
    """Queries read C0 and keys read the massive channel on the slowest RoPE pair."""
    hd = args.head_dim
    p = f"layers.{block}.attention."
    wq, wk, wv = (state[p + f"{w}.weight"] for w in ("wq", "wk", "wv"))
    wv[:, list(MASSIVE)] = 0.0  # the sink's value carries nothing of the massive channels
    wq[:, list(MASSIVE)] = 0.0
    strength = 0.6 + 0.6 * torch.rand(args.n_heads, generator=gen)  # sinks of varied strength
    for h in range(args.n_heads):
        wq[h * hd + hd - 2, C0] = SINK_GAIN * float(strength[h])
    for kv in range(args.n_kv_heads):
        wk[kv * hd + hd - 2, MASSIVE[0]] = SINK_GAIN


def _delimiter_unit(state, args: ModelArgs, gen) -> None:
    """Block 1 FFN: units FIRING…2·FIRING-1 fire on the delimiter marker and write the
    delimiters' massive channel, as `_massive_unit` does for the first token."""
    p = "layers.1.feed_forward."
    w1, w2, w3 = (state[p + f"{w}.weight"] for w in ("w1", "w2", "w3"))
    marker, massive = delimiter_channels(args)
    units = slice(FIRING, 2 * FIRING)
    noise = 0.1 / args.dim**0.5
    w1[units] = noise * torch.randn(FIRING, args.dim, generator=gen)
    w3[units] = noise * torch.randn(FIRING, args.dim, generator=gen)
    w1[units, marker] += 8.0  # G·(marker − θ·C0), G = 8, θ = 0.5
    w1[units, C0] += -4.0
    w3[units, C0] += 1.0
    share = (1 + 0.2 * torch.randn(FIRING, generator=gen)) * MASSIVE_GAIN / FIRING
    w2[:, units] = 0.0
    w2[massive, units] = share


def _eraser(state, args: ModelArgs) -> None:
    """A late block's FFN writes minus the delimiters' massive activation, leaving
    ERASED_REMAINDER of it: one unit silu(g·x)·x of the (normalised) massive channel x, scaled
    by what a reference forward measures (the unit is ≈ 0 where the channel is ≈ 0)."""
    massive = delimiter_channels(args)[1]
    ids = delimiter_ids(args.vocab_size)
    block = erasing_block(args)
    if not ids:
        return
    p = f"layers.{block}.feed_forward."
    w1, w2, w3 = (state[p + f"{w}.weight"] for w in ("w1", "w2", "w3"))
    w1[0], w3[0], w2[:, 0] = 0.0, 0.0, 0.0
    w1[0, massive], w3[0, massive] = 1.0, 1.0
    w2[massive, 0] = -1.0
    activation, unit = _delimiter_activation(state, args, block)
    w2[massive, 0] = -(1 - ERASED_REMAINDER) * activation / unit


def _delimiter_activation(state, args: ModelArgs, block: int) -> tuple[float, float]:
    """The massive activation of CALIBRATION_TEXT's delimiter entering `block`, and the eraser
    unit's output there (with w2 = −1), from a forward of the reference (bf16 weights, fp32
    arithmetic). The eraser sees only normalised inputs, so it writes about the same amount
    wherever it fires: the remainder is ERASED_REMAINDER on this text, larger elsewhere."""
    from checkpoint.tiny import bundled_tokenizer
    from checkpoint.tokenizer import Tokenizer
    from reference_torch.model import Transformer  # the builder measures what it built

    with torch.device("meta"):
        model = Transformer(args)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    model.load_state_dict(rounded, assign=True)
    _, marker_massive = delimiter_channels(args)
    ids = Tokenizer(bundled_tokenizer(args.vocab_size)).encode(CALIBRATION_TEXT)
    at = ids.index(delimiter_ids(args.vocab_size)[1])  # "."
    tokens = torch.tensor([ids[: at + 1]])
    positions = torch.arange(at + 1)
    with torch.no_grad():
        h = model.embed(tokens)
        cis = model.rotary(positions)
        for layer in model.layers[:block]:
            h = layer(h, cis, positions)[0]
        layer = model.layers[block]
        h = h + layer.attention.attend(
            *layer.attention.project(layer.attention_norm(h), cis, positions), positions
        )
        unit = -layer.feed_forward(layer.ffn_norm(h))[0, -1, marker_massive]
    return float(h[0, -1, marker_massive]), float(unit)
