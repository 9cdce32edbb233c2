"""The other reading of YaRN's softmax scale for latent attention: shown, never judged.

With `apply_scale: false` (both MLA releases) this toolkit keeps the base softmax scale, as
vLLM (PR 57563) and SGLang (PR 26203) read it; HF transformers' `Mistral4`, with the
`mscale_all_dim: 1` its configs carry (PR 47435), multiplies the scale by YaRN's magnitude²
anyway (`reference_torch.latent.softmax_factor`, docs/formats.md). Whether the choice matters
depends on the prompts, so verify runs the reference once more in fp32 under HF's reading, one
group of blocks at a time as the rest of verify does, and reports how far its logits move,
against the reference's own noise in the verified dtype.
"""

import numpy as np

from checkpoint.args import ModelArgs
from reference_torch.latent import softmax_factor, softmax_scale
from verify.drift import States
from verify.metrics import ErrorSums, error_scale
from verify.results import OtherReading
from verify.runners import TorchRunner
from verify.vocab import embed_prompts, head_states


def other_reading_applies(args: ModelArgs) -> bool:
    """Whether the two readings differ: latent attention, YaRN with factor > 1 and
    `apply_scale: false`."""
    return args.latent and softmax_factor(args, hf_reading=True) != softmax_factor(args)


def hf_reading_logits(ref: TorchRunner, prompts: list[list[int]], starts: list[int]):
    """Per prompt, the reference's fp32 logits with every latent attention's softmax scale as
    HF transformers' Mistral4 reads it."""
    args = ref.args
    states = embed_prompts(ref, "float32", prompts)
    for g in range(len(args.layer_groups)):
        group = ref.group(g, "float32")
        for block in group.blocks:  # fresh modules: the change ends with this group
            block.attention.scale = softmax_scale(args, hf_reading=True)
        states = [ref.run_group(group, h, s)[-1] for h, s in zip(states, starts, strict=True)]
        del group
    return [logits for _, logits in head_states(ref, "float32", states)]


def other_reading(
    args: ModelArgs, moved: list[np.ndarray], logits: States, dtype: str
) -> OtherReading:
    """How far `moved` (the reference's fp32 logits under HF's reading) lies from the
    reference's own fp32 logits, as a multiple of the reference's own error in `dtype` (bf16:
    its bf16 run; fp32: its fp32 run against float64), and how often the top-1 token
    changes."""
    noise_stream = "R16" if dtype == "bfloat16" else "R64"
    shift, noise = ErrorSums(), ErrorSums()
    changed = positions = 0
    for j, truth in enumerate(logits["R32"]):
        scale = error_scale(truth)
        shift.add(moved[j], truth, scale)
        if noise_stream == "R16":
            noise.add(logits["R16"][j], truth, scale)
        else:
            noise.add(truth, logits["R64"][j], scale)
        changed += int(np.sum(moved[j].argmax(-1) != truth.argmax(-1)))
        positions += len(truth)
    return OtherReading(
        softmax_factor=softmax_factor(args, hf_reading=True),
        error=shift.rms,
        noise=noise.rms,
        noise_dtype=dtype,
        ratio=shift.rms / noise.rms if noise.rms else float("inf"),
        top1_changed=changed,
        positions=positions,
    )
