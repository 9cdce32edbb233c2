"""A third implementation for the report: HF transformers, run on the same prompts.

The reference folder is exported with `mistral-convert --format hf` into a temporary folder and
loaded with `AutoModelForCausalLM` in fp32 and bf16; its hidden states (embeddings, after each
block but the last, final norm) and logits join the report as extra columns. transformers is an
optional dependency (`pip install transformers`).
"""

import importlib
import tempfile
from pathlib import Path

import torch

from checkpoint.dtypes import torch_dtype
from convert.convert import convert_checkpoint


def hf_peer_outputs(reference: Path, prompts: list[list[int]], device: str):
    """({dtype: per prompt, the L+1 hidden states}, {dtype: per prompt, the logits})."""
    try:
        transformers = importlib.import_module("transformers")
    except ModuleNotFoundError:
        raise ValueError("--peer hf needs transformers: pip install transformers") from None
    states, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        convert_checkpoint(reference, folder, layout="hf")
        for name in ("float32", "bfloat16"):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype(name)
            )
            model = model.to(device).eval()
            states[name], logits[name] = [], []
            with torch.inference_mode():
                for prompt in prompts:
                    out = model(torch.tensor([prompt], device=device), output_hidden_states=True)
                    states[name].append([h[0].float().cpu().numpy() for h in out.hidden_states])
                    logits[name].append(out.logits[0].float().cpu().numpy())
            del model
    return states, logits
