"""The one key → shape spec of an official checkpoint, derived from `ModelArgs`.

Key names and `(out, in)` shapes as in mistral-inference `transformer.py` / `moe.py`; the
converter, both models and the verifier all check against this table. Beside the text decoder a
folder may hold FP8 scales, vision tensors and fake-quantizer scales: `classify` says which.
"""

import dataclasses
import re

from checkpoint.args import ModelArgs

Shape = tuple[int, ...]


def layer_spec(args: ModelArgs, i: int = -1) -> dict[str, Shape]:
    """Shapes of block i's tensors (default: the last block's kind), keyed by the name after
    `layers.N.` — the first `args.dense_layers` blocks have a dense FFN."""
    spec = _attention_spec(args)
    d, moe = args.dim, args.moe
    if moe is None or i % args.n_layers < args.dense_layers:
        spec |= _ffn("feed_forward", args.hidden_dim, d)
    elif moe.fine_grained:  # Mistral Small 4 / Large 3: at the block's top level
        spec["gate.weight"] = (moe.num_experts, d)
        if moe.num_shared_experts:
            spec |= _ffn("shared_experts", moe.num_shared_experts * moe.expert_hidden_dim, d)
        for e in range(moe.num_experts):
            spec |= _ffn(f"experts.{e}", moe.expert_hidden_dim, d)
    else:  # Mixtral
        spec["feed_forward.gate.weight"] = (moe.num_experts, d)
        for e in range(moe.num_experts):
            spec |= _ffn(f"feed_forward.experts.{e}", args.hidden_dim, d)
    spec |= {"attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    return spec


def _attention_spec(args: ModelArgs) -> dict[str, Shape]:
    d, h = args.dim, args.n_heads
    if args.latent:
        rope, nope, v = args.qk_rope_head_dim, args.qk_nope_head_dim, args.v_head_dim
        return {
            "attention.wq_a.weight": (args.q_lora_rank, d),
            "attention.q_a_norm.weight": (args.q_lora_rank,),
            "attention.wq_b.weight": (h * (nope + rope), args.q_lora_rank),
            "attention.wkv_a_with_mqa.weight": (args.kv_lora_rank + rope, d),
            "attention.kv_a_norm.weight": (args.kv_lora_rank,),
            "attention.wkv_b.weight": (h * (nope + v), args.kv_lora_rank),
            "attention.wo.weight": (d, h * v),
        }
    q_out, kv_out = h * args.head_dim, args.n_kv_heads * args.head_dim
    return {
        "attention.wq.weight": (q_out, d),
        "attention.wk.weight": (kv_out, d),
        "attention.wv.weight": (kv_out, d),
        "attention.wo.weight": (d, q_out),
    }


def _ffn(prefix: str, hidden: int, dim: int) -> dict[str, Shape]:
    return {
        f"{prefix}.w1.weight": (hidden, dim),
        f"{prefix}.w2.weight": (dim, hidden),
        f"{prefix}.w3.weight": (hidden, dim),
    }


def tensor_spec(args: ModelArgs) -> dict[str, Shape]:
    """Every text-decoder tensor in model order: embeddings, blocks, final norm, head (none
    when the head is tied to the embeddings)."""
    spec: dict[str, Shape] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    first, last = layer_spec(args, 0), layer_spec(args, args.n_layers - 1)
    for i in range(args.n_layers):
        per_layer = first if i < args.dense_layers else last
        spec |= {f"layers.{i}.{name}": shape for name, shape in per_layer.items()}
    spec["norm.weight"] = (args.dim,)
    if not args.tied_embeddings:
        spec["output.weight"] = (args.vocab_size, args.dim)
    return spec


def shell_modules(args: ModelArgs, part: str) -> tuple[str, ...]:
    """The modules outside the blocks that `part` of the model needs: "embed" the embeddings,
    "head" the final norm and the head (the embeddings, where the head is tied to them)."""
    if part == "embed":
        return ("tok_embeddings",)
    if part == "head":
        return ("norm", "tok_embeddings" if args.tied_embeddings else "output")
    raise ValueError(f"part must be 'embed' or 'head', got {part!r}")


def vocab_table(args: ModelArgs, part: str) -> str:
    """The module of `part` (`shell_modules`) with one row per vocabulary entry: the
    embeddings, or the head (the embeddings, where the head is tied to them)."""
    return shell_modules(args, part)[-1]


# Tensors a multimodal folder keeps beside the text decoder (carried into OUT, loaded by none).
VISION_PREFIXES = (
    "vision_encoder.",
    "vision_language_adapter.",
    "patch_merger.",
    "pre_mm_projector_norm.",
)
FP8 = "F8_E4M3"
WEIGHT_SCALE, ACTIVATION_SCALE = "qscale_weight", "qscale_act"
BLOCK_SCALE = "weight_scale"  # compressed-tensors block FP8: one scale per block of the weight
# FP8 KV-cache / attention fake-quantizer scales of served checkpoints: carried, unused.
_FAKE_QUANTIZER = re.compile(r"layers\.\d+\.attention\.(kv|q|k|v)_fake_quantizer\.qscale_act")


@dataclasses.dataclass(frozen=True)
class Roles:
    """What each tensor of a folder is for, beyond the text decoder's weights."""

    weight_scales: dict[str, str]  # X.qscale_weight (X.weight_scale) → X.weight (fp8 × scale)
    activation_scales: tuple[str, ...]  # X.qscale_act: static input scales (unused: bf16 runs)
    carried: tuple[str, ...]  # vision tensors, carried byte for byte
    unused: tuple[str, ...]  # fake-quantizer scales, carried and reported unused

    @property
    def quantized(self) -> tuple[str, ...]:
        """The FP8 weights."""
        return tuple(self.weight_scales.values())


def classify(found: dict[str, tuple[Shape, str]], args: ModelArgs) -> tuple[Roles, list[str]]:
    """The roles of a folder's tensors (name → (shape, dtype name)) and its problems (missing,
    unexpected or misshapen tensors, scales without an FP8 weight and the reverse) as
    readable one-liners."""
    expected = tensor_spec(args)
    problems = [
        f"missing tensor {k} (expected shape {list(s)})"
        for k, s in expected.items()
        if k not in found
    ]
    problems += [
        f"tensor {k} has shape {list(found[k][0])}, expected {list(s)}"
        for k, s in expected.items()
        if k in found and tuple(found[k][0]) != s
    ]
    scales, acts, carried, unused = {}, [], [], []
    scale_kind = BLOCK_SCALE if args.fp8_block else WEIGHT_SCALE
    for name, (shape, dtype) in found.items():
        if name in expected:
            if dtype == FP8 and f"{name.removesuffix('.weight')}.{scale_kind}" not in found:
                problems.append(f"tensor {name} is FP8 without its {scale_kind}")
            continue
        base, _, kind = name.rpartition(".")
        weight = f"{base}.weight"
        if kind in (scale_kind, ACTIVATION_SCALE) and weight in expected:
            problems += _scale_problems(name, shape, found[weight], kind, args.fp8_block)
            if kind == scale_kind:
                scales[name] = weight
            else:
                acts.append(name)
        elif name.startswith(VISION_PREFIXES) and args.has_vision:
            carried.append(name)
        elif _FAKE_QUANTIZER.fullmatch(name) and args.quantization is not None:
            unused.append(name)
        else:
            problems.append(f"unexpected tensor {name}")
    if scales and args.quantization is None and args.quantization_config is None:
        problems.append("FP8 weights (qscale_weight) but no quantization in params.json")
    return Roles(scales, tuple(acts), tuple(carried), tuple(unused)), problems


def block_grid(weight_shape: Shape, block: tuple[int, int]) -> Shape:
    """How many blocks of `block` (rows × columns) tile a weight, a partial block counted."""
    return tuple(-(-size // b) for size, b in zip(weight_shape, block, strict=True))


def _scale_problems(
    name: str, shape: Shape, weight: tuple[Shape, str], kind: str, block: tuple[int, int] | None
) -> list[str]:
    """A weight scale: 0-d, one element or one per output row, beside an FP8 weight (with
    block FP8: one per block); an activation scale: 0-d or one element."""
    (weight_shape, weight_dtype), shape = weight, tuple(shape)
    if kind == BLOCK_SCALE:
        grid = block_grid(weight_shape, block)
        if shape != grid:
            return [
                f"tensor {name} has shape {list(shape)}, expected {list(grid)} (one scale per "
                f"{block[0]}×{block[1]} block of its weight {list(weight_shape)})"
            ]
    elif shape not in [(), (1,)] + ([(weight_shape[0],)] if kind == WEIGHT_SCALE else []):
        return [
            f"tensor {name} has shape {list(shape)}, expected [] or [1]"
            + (f" or [{weight_shape[0]}]" if kind == WEIGHT_SCALE else "")
        ]
    if kind in (WEIGHT_SCALE, BLOCK_SCALE) and weight_dtype != FP8:
        return [f"tensor {name} scales a weight that is not FP8 ({weight_dtype})"]
    return []
