"""What a conversion writes: for each source tensor its output name, dtype and the transform
or dequantization on the way (`plan_output`), and the manifest's account of what was carried,
dequantized and left out, and why."""

import dataclasses

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError
from checkpoint.hf_mistral4 import stacked_experts
from checkpoint.hf_names import interleaved_to_halves, rotary_heads, to_hf_name
from checkpoint.spec import FP8
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord
from convert.sources import Source, Transform

# Why tensors are left out or carried, as the manifest says it.
WHY_TEXT_ONLY = "--text-only: the vision encoder is not part of the text model"
WHY_HF_TEXT = (
    "--format hf exports the text model (transformers' *ForCausalLM); the vision encoder is "
    "not part of it"
)
WHY_DEQUANTIZED = "the FP8 weights were dequantized: their scales mean nothing to the result"
WHY_CARRIED = (
    "vision encoder (params.json declares one): copied byte for byte whatever the dtype; "
    "no model of this toolkit loads it"
)
WHY_UNUSED = "FP8 attention fake-quantizer scales: copied byte for byte, unused by these models"
HOW_DEQUANTIZED = (
    "float32(fp8) × float32(qscale_weight) (a per-row scale multiplies its row; a block "
    "weight_scale its block), rounded once to the target dtype"
)
# params.json keys the HF export cannot carry, and why.
NOT_EXPORTED = {
    "quantization": "the FP8 weights are dequantized",
    "quantization_config": "the FP8 weights are dequantized",
    "vision_encoder": "the text model only",
    "multimodal": "the text model only",
    "max_seq_len": "a runtime length; transformers has no such key",
}


@dataclasses.dataclass(frozen=True)
class Planned:
    """One output tensor: its name, where its bytes come from, and what to do to them."""

    name: str
    record: TensorRecord
    out_dtype: str
    transform: Transform | None = None  # applied to the whole array (HF wq/wk rows)
    scale: str | None = None  # an FP8 weight dequantized with this scale tensor first

    @property
    def nbytes(self) -> int:
        count = self.record.nbytes // NUMPY_DTYPES[self.record.dtype].itemsize
        return count * NUMPY_DTYPES[self.out_dtype].itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return self.record.shape

    @property
    def parts(self) -> tuple["Planned", ...]:
        return (self,)


@dataclasses.dataclass(frozen=True)
class Stacked:
    """One output tensor written as planned tensors back to back (HF Mistral4's stacked
    experts): one part's chunk in memory at a time, never the whole tensor."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[Planned, ...]

    @property
    def out_dtype(self) -> str:
        return self.parts[0].out_dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclasses.dataclass(frozen=True)
class Plan:
    tensors: list[Planned | Stacked]  # what OUT holds, in order
    args: ModelArgs  # the model OUT describes (without what was left out)
    params_removed: tuple[str, ...]  # top-level params.json keys left out
    contents: dict  # the manifest's account of it


def plan_output(checkpoint: Source, layout: str, target: str | None, text_only: bool) -> Plan:
    """What to write for each source tensor, and the account of what is carried, dequantized
    and left out."""
    roles, args = checkpoint.roles, checkpoint.args
    scale_of = {weight: scale for scale, weight in roles.weight_scales.items()}
    scales = {*roles.weight_scales, *roles.activation_scales, *roles.unused}
    # The HF export is always dequantized (transformers' Ministral3 has no FP8 of this form).
    dequantize = (layout == "hf" or target is not None) and (
        args.quantization is not None or args.quantization_config is not None or bool(scales)
    )
    drop_vision = layout == "hf" or text_only
    vision_why = WHY_HF_TEXT if layout == "hf" else WHY_TEXT_ONLY
    carried_names = set(roles.carried)
    planned: list[Planned] = []
    left_out: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {"carried": [], "unused": [], "dequantized": [], "fp8": []}
    text = 0
    for name, record in checkpoint.tensors.items():
        fix = checkpoint.transforms.get(name)
        if name in carried_names:
            if drop_vision:
                left_out.setdefault(vision_why, []).append(name)
            else:
                planned.append(Planned(name, record, record.dtype))  # byte for byte
                groups["carried"].append(name)
            continue
        if name in scales:
            if dequantize:
                left_out.setdefault(WHY_DEQUANTIZED, []).append(name)
            else:
                planned.append(Planned(name, record, record.dtype))
                groups["unused" if name in roles.unused else "fp8"].append(name)
            continue
        text += 1
        scale = scale_of.get(name) if dequantize else None
        out_dtype = target or ("BF16" if scale else record.dtype)
        if scale:
            groups["dequantized"].append(name)
        elif record.dtype == FP8:
            groups["fp8"].append(name)
        if layout == "hf":
            heads = rotary_heads(name, args)
            transform = fix
            if heads:

                def transform(w, fix=fix, heads=heads):
                    return interleaved_to_halves(fix(w) if fix else w, heads)

            planned.append(Planned(to_hf_name(name), record, out_dtype, transform, scale))
        else:
            planned.append(Planned(name, record, out_dtype, fix, scale))

    if layout == "hf":
        planned = _stack_experts(planned, args)
    out_args = args
    if drop_vision:
        out_args = out_args.text_only()
    if dequantize:
        out_args = dataclasses.replace(out_args, quantization=None, quantization_config=None)
    removed = tuple(
        key
        for key, gone in (
            ("quantization", dequantize),
            ("quantization_config", dequantize),
            ("vision_encoder", drop_vision),
            ("multimodal", drop_vision),
        )
        if gone and getattr(args, key) is not None
    )
    contents: dict = {"text_tensors": text}
    if groups["carried"]:
        contents["carried"] = {"tensors": groups["carried"], "why": WHY_CARRIED}
    if groups["unused"]:
        contents["unused"] = {"tensors": groups["unused"], "why": WHY_UNUSED}
    if groups["fp8"]:
        contents["fp8_kept"] = {
            "tensors": groups["fp8"],
            "why": "--dtype keep: FP8 weights and their scales copied byte for byte; every "
            "FP8 byte checked (none is NaN), every scale finite",
        }
    if groups["dequantized"]:
        contents["dequantized"] = {
            "tensors": groups["dequantized"],
            "from": FP8,
            "to": target or "BF16",
            "how": HOW_DEQUANTIZED,
        }
    contents["left_out"] = [{"tensors": names, "why": why} for why, names in left_out.items()]
    contents["params"] = _params_account(checkpoint, layout, removed)
    return Plan(planned, out_args, removed, contents)


def _stack_experts(planned: list[Planned], args: ModelArgs) -> list[Planned | Stacked]:
    """The expert tensors replaced by HF Mistral4's stacked ones, each where its first part
    was (`checkpoint.hf_mistral4.stacked_experts`)."""
    stacked = stacked_experts(args)
    by_source = {p.record.name: p for p in planned}
    first_part = {parts[0]: (name, shape, parts) for name, (shape, parts) in stacked.items()}
    in_stack = {part for _, parts in stacked.values() for part in parts}
    out: list[Planned | Stacked] = []
    for p in planned:
        if p.record.name in first_part:
            name, shape, parts = first_part[p.record.name]
            planned_parts = tuple(by_source[n] for n in parts)
            dtypes = sorted({part.out_dtype for part in planned_parts})
            if len(dtypes) > 1:  # one tensor has one dtype: name what would break it
                raise CheckpointError(
                    p.record.path, f"{name}: its parts would be written as {', '.join(dtypes)}"
                )
            out.append(Stacked(name, shape, planned_parts))
        elif p.record.name not in in_stack:
            out.append(p)
    return out


def _params_account(checkpoint: Source, layout: str, removed: tuple[str, ...]) -> dict:
    if layout == "hf":
        gone = {k: why for k, why in NOT_EXPORTED.items() if getattr(checkpoint.args, k)}
        return {"written": "config.json from params.json", "not_exported": gone}
    if checkpoint.layout == "hf":
        return {"written": "params.json from config.json"}
    if removed:
        return {
            "written": "params.json of the source without " + ", ".join(removed),
            "removed_keys": list(removed),
        }
    return {"written": "params.json of the source, copied as is"}


def torch_dtype_of(planned: list[Planned | Stacked]) -> str:
    dtypes = {p.out_dtype for p in planned}
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
        dtypes.pop() if len(dtypes) == 1 else "", "float32"
    )
