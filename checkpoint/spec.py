"""The one key → shape spec of an official checkpoint, derived from `ModelArgs`.

Key names and `(out, in)` shapes as in mistral-inference `transformer.py` / `moe.py`; the
converter, both models and the verifier all check against this table. Beside the text decoder a
folder may hold FP8 scales, vision tensors and fake-quantizer scales: `classify` says which.
"""

import dataclasses
import re

from checkpoint.args import ModelArgs

Shape = tuple[int, ...]


def layer_spec(args: ModelArgs) -> dict[str, Shape]:
    """Shapes of one block's tensors, keyed by the name after `layers.N.`."""
    q_out = args.n_heads * args.head_dim
    kv_out = args.n_kv_heads * args.head_dim
    spec: dict[str, Shape] = {
        "attention.wq.weight": (q_out, args.dim),
        "attention.wk.weight": (kv_out, args.dim),
        "attention.wv.weight": (kv_out, args.dim),
        "attention.wo.weight": (args.dim, q_out),
    }
    if args.moe is None:
        spec |= {
            "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            "feed_forward.w3.weight": (args.hidden_dim, args.dim),
        }
    else:
        spec["feed_forward.gate.weight"] = (args.moe.num_experts, args.dim)
        for e in range(args.moe.num_experts):
            spec |= {
                f"feed_forward.experts.{e}.w1.weight": (args.hidden_dim, args.dim),
                f"feed_forward.experts.{e}.w2.weight": (args.dim, args.hidden_dim),
                f"feed_forward.experts.{e}.w3.weight": (args.hidden_dim, args.dim),
            }
    spec |= {"attention_norm.weight": (args.dim,), "ffn_norm.weight": (args.dim,)}
    return spec


def tensor_spec(args: ModelArgs) -> dict[str, Shape]:
    """Every text-decoder tensor in model order: embeddings, blocks, final norm, head (none
    when the head is tied to the embeddings)."""
    spec: dict[str, Shape] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    per_layer = layer_spec(args)
    for i in range(args.n_layers):
        spec |= {f"layers.{i}.{name}": shape for name, shape in per_layer.items()}
    spec["norm.weight"] = (args.dim,)
    if not args.tied_embeddings:
        spec["output.weight"] = (args.vocab_size, args.dim)
    return spec


# Tensors a multimodal folder keeps beside the text decoder (carried into OUT, loaded by none).
VISION_PREFIXES = (
    "vision_encoder.",
    "vision_language_adapter.",
    "patch_merger.",
    "pre_mm_projector_norm.",
)
FP8 = "F8_E4M3"
WEIGHT_SCALE, ACTIVATION_SCALE = "qscale_weight", "qscale_act"
# FP8 KV-cache / attention fake-quantizer scales of served checkpoints: carried, unused.
_FAKE_QUANTIZER = re.compile(r"layers\.\d+\.attention\.(kv|q|k|v)_fake_quantizer\.qscale_act")


@dataclasses.dataclass(frozen=True)
class Roles:
    """What each tensor of a folder is for, beyond the text decoder's weights."""

    weight_scales: dict[str, str]  # X.qscale_weight → X.weight (weight = fp8 × scale)
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
    for name, (shape, dtype) in found.items():
        if name in expected:
            if dtype == FP8 and f"{name.removesuffix('.weight')}.{WEIGHT_SCALE}" not in found:
                problems.append(f"tensor {name} is FP8 without its {WEIGHT_SCALE}")
            continue
        base, _, kind = name.rpartition(".")
        weight = f"{base}.weight"
        if kind in (WEIGHT_SCALE, ACTIVATION_SCALE) and weight in expected:
            problems += _scale_problems(name, shape, found[weight], kind)
            if kind == WEIGHT_SCALE:
                scales[name] = weight
            else:
                acts.append(name)
        elif name.startswith(VISION_PREFIXES) and args.has_vision:
            carried.append(name)
        elif _FAKE_QUANTIZER.fullmatch(name) and args.quantization is not None:
            unused.append(name)
        else:
            problems.append(f"unexpected tensor {name}")
    if scales and args.quantization is None:
        problems.append("FP8 weights (qscale_weight) but no quantization in params.json")
    return Roles(scales, tuple(acts), tuple(carried), tuple(unused)), problems


def _scale_problems(name: str, shape: Shape, weight: tuple[Shape, str], kind: str) -> list[str]:
    """A weight scale: 0-d, one element or one per output row, beside an FP8 weight; an
    activation scale: 0-d or one element."""
    (weight_shape, weight_dtype), shape = weight, tuple(shape)
    allowed = [(), (1,)] + ([(weight_shape[0],)] if kind == WEIGHT_SCALE else [])
    if shape not in allowed:
        return [
            f"tensor {name} has shape {list(shape)}, expected [] or [1]"
            + (f" or [{weight_shape[0]}]" if kind == WEIGHT_SCALE else "")
        ]
    if kind == WEIGHT_SCALE and weight_dtype != FP8:
        return [f"tensor {name} scales a weight that is not FP8 ({weight_dtype})"]
    return []
