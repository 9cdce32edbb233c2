"""A third implementation for the report: HF transformers, run on the same prompts.

The reference folder is exported with `mistral-convert --format hf` into a temporary folder and
loaded in fp32 and bf16 by the class its config.json names (`architectures`: transformers 5.x
does not register `Mistral4ForCausalLM`, the latent-attention export, with
`AutoModelForCausalLM`). The peer offers only its whole forward
(`verify.implementation.WholeForward`): its hidden states (embeddings, after each block but the
last, final norm) and logits join the report as extra columns; it is not judged piece by piece.
transformers is an optional dependency (`pip install transformers`).
"""

import contextlib
import importlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from checkpoint.args import ModelArgs
from checkpoint.dtypes import torch_dtype
from convert.convert import convert_checkpoint
from verify.implementation import WholeForward


class HFPeer:
    """HF transformers on an HF export of the reference folder."""

    def __init__(self, folder: Path, args: ModelArgs, device: str):
        try:
            self._transformers = importlib.import_module("transformers")
        except ModuleNotFoundError:
            raise ValueError("--peer hf needs transformers: pip install transformers") from None
        self._transformers.utils.logging.disable_progress_bar()  # verify draws its own
        self.folder, self.args, self.device = folder, args, device
        (architecture,) = json.loads((folder / "config.json").read_text())["architectures"]
        self._model_class = getattr(self._transformers, architecture, None)
        if self._model_class is None:
            raise ValueError(
                f"--peer hf needs transformers with {architecture} (installed: "
                f"{self._transformers.__version__})"
            )

    def model(self, dtype: str):
        model = self._model_class.from_pretrained(self.folder, dtype=torch_dtype(dtype))
        return model.to(self.device).eval()

    @torch.inference_mode()
    def forward_hidden(
        self, model, tokens: list[int], start: int = 0
    ) -> tuple[list[np.ndarray], np.ndarray]:
        positions = torch.arange(start, start + len(tokens), device=self.device)[None]
        out = model(
            torch.tensor([tokens], device=self.device),
            position_ids=positions,
            output_hidden_states=True,
        )
        hidden = [h[0].float().cpu().numpy() for h in out.hidden_states]
        return hidden, out.logits[0].float().cpu().numpy()


@contextlib.contextmanager
def hf_peer(reference: Path, args: ModelArgs, device: str) -> Iterator[HFPeer]:
    """The HF peer of `reference`, its export removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        convert_checkpoint(reference, folder, layout="hf")
        yield HFPeer(folder, args, device)


def peer_outputs(peer: WholeForward, prompts: list[list[int]], starts: list[int]):
    """({dtype: per prompt, the hidden states}, {dtype: per prompt, the logits}), one dtype's
    model resident at a time."""
    states, logits = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = peer.model(dtype)
        outputs = [
            peer.forward_hidden(model, prompt, start)
            for prompt, start in zip(prompts, starts, strict=True)
        ]
        states[dtype], logits[dtype] = [o[0] for o in outputs], [o[1] for o in outputs]
        del model
    return states, logits
