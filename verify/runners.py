"""Both models, driven through the pieces their own forward is made of: `embed`, each block
(and, inside it, `attention_norm`, `attention`, `ffn_norm`, `feed_forward`), `head`. Verify
calls these and nothing else, so what it judges is the code users run.

`TorchRunner` reads the reference's weights with torch's own readers
(`reference_torch.loading`), `JaxRunner` the converted folder with the port's loader
(`model_jax.loading`): two independent paths to the bytes. Each can load the whole model (its
own `forward_hidden` gives the free-running states and logits) or one block at a time.
Hidden states cross between them as float32 numpy arrays (exact for bf16 values).
"""

import functools
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import model_jax
import reference_torch
from model_jax.generate import bucket
from model_jax.loading import PortLoader, skeleton
from reference_torch.loading import ReferenceLoader

SUBLAYERS = ("attention_norm", "attention", "ffn_norm", "feed_forward")
PIECES = (*SUBLAYERS, "block")  # "block": the block's own forward on its input


def padded_length(n: int) -> int:
    """The JAX side pads sequences to a few lengths, so prompts share compilations: powers of
    two from 64 up to 512, then multiples of 256 (≤ 1.5× the work)."""
    return bucket(n, 64) if n <= 512 else -(-n // 256) * 256


Pieces = dict[str, np.ndarray]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class TorchRunner:
    """The reference (official folder)."""

    def __init__(self, folder: Path, device: str):
        self.loader = ReferenceLoader(folder)
        self.args, self.device = self.loader.args, device
        with torch.device("meta"):  # for `rotary`, which needs the config only
            self._shape_only = reference_torch.Transformer(self.args)

    def model(self, dtype: str) -> reference_torch.Transformer:
        return self.loader.model(dtype=dtype, device=self.device)

    def shell(self, dtype: str) -> reference_torch.Transformer:
        return self.loader.shell(dtype=dtype, device=self.device)

    def block(self, i: int, dtype: str) -> reference_torch.model.TransformerBlock:
        return self.loader.block(i, dtype=dtype, device=self.device)

    def _tensor(self, x: np.ndarray, like: torch.nn.Module) -> torch.Tensor:
        dtype = next(like.parameters()).dtype
        return torch.from_numpy(x).to(device=self.device, dtype=dtype)[None]

    @torch.inference_mode()
    def forward_hidden(self, model, tokens: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
        logits, hidden = model.forward_hidden(torch.tensor([tokens], device=self.device))
        return [_numpy(h[0]) for h in hidden], _numpy(logits[0])

    @torch.inference_mode()
    def embed(self, shell, tokens: list[int]) -> np.ndarray:
        return _numpy(shell.embed(torch.tensor([tokens], device=self.device))[0])

    @torch.inference_mode()
    def head(self, shell, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        normed, logits = shell.head(self._tensor(h, shell.norm))
        return _numpy(normed[0]), _numpy(logits[0])

    def _rotary(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(n, device=self.device)
        return self._shape_only.rotary(positions), positions

    @torch.inference_mode()
    def run_block(self, block, h: np.ndarray) -> np.ndarray:
        cis, positions = self._rotary(h.shape[0])
        return _numpy(block(self._tensor(h, block), cis, positions)[0][0])

    @torch.inference_mode()
    def traced(self, block, h: np.ndarray) -> tuple[Pieces, Pieces]:
        """Run the block's own forward on `h`; the input and output of each of its pieces."""
        cis, positions = self._rotary(h.shape[0])
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def recorder(name):
            def hook(module, inputs, output):
                seen[name] = (inputs[0], output[0] if isinstance(output, tuple) else output)

            return hook

        handles = [getattr(block, n).register_forward_hook(recorder(n)) for n in SUBLAYERS]
        try:
            x = self._tensor(h, block)
            out = block(x, cis, positions)[0]
        finally:
            for handle in handles:
                handle.remove()
        inputs = {n: _numpy(seen[n][0][0]) for n in SUBLAYERS} | {"block": _numpy(x[0])}
        outputs = {n: _numpy(seen[n][1][0]) for n in SUBLAYERS} | {"block": _numpy(out[0])}
        return inputs, outputs

    @torch.inference_mode()
    def pieces(self, block, inputs: Pieces) -> Pieces:
        """Each piece of the block run on its given input (teacher forcing)."""
        cis, positions = self._rotary(inputs["block"].shape[0])
        x = {name: self._tensor(value, block) for name, value in inputs.items()}
        out = {
            "attention_norm": block.attention_norm(x["attention_norm"]),
            "attention": block.attention(x["attention"], cis, positions)[0],
            "ffn_norm": block.ffn_norm(x["ffn_norm"]),
            "feed_forward": block.feed_forward(x["feed_forward"]),
            "block": block(x["block"], cis, positions)[0],
        }
        return {name: _numpy(value[0]) for name, value in out.items()}


class JaxRunner:
    """The port (converted folder), on JAX's default device; with a mesh, weights sharded and
    activations replicated."""

    def __init__(self, folder: Path, mesh: Mesh | None = None):
        self.loader = PortLoader(folder)
        self.args, self.mesh = self.loader.args, mesh

    def model(self, dtype: str) -> model_jax.Transformer:
        return self.loader.model(dtype=dtype, mesh=self.mesh)

    def shell(self, dtype: str) -> model_jax.Transformer:
        return self.loader.shell(dtype=dtype, mesh=self.mesh)

    def block(self, i: int, dtype: str) -> model_jax.model.TransformerBlock:
        return self.loader.block(i, dtype=dtype, mesh=self.mesh)

    def _place(self, x: np.ndarray, dtype) -> jax.Array:
        """`x` on the device (replicated over the mesh), its sequence padded at the end to a
        length bucket: the model is causal, so padding cannot change earlier positions, and
        prompts of similar lengths share one compilation (as `model_jax.generate` does)."""
        padded = np.zeros((padded_length(x.shape[0]), *x.shape[1:]), jnp.dtype(dtype))
        padded[: x.shape[0]] = x  # cast on the host: no device program per shape
        if self.mesh is None:  # on the default device, as the model's own callers place it
            return jax.device_put(padded)
        return jax.device_put(padded, NamedSharding(self.mesh, PartitionSpec()))

    @staticmethod
    def _fetch(x: jax.Array, n: int) -> np.ndarray:
        return np.asarray(x, np.float32)[..., :n, :]

    def forward_hidden(self, model, tokens: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
        logits, hidden = model.forward_hidden(self._place(np.asarray(tokens), jnp.int32))
        n = len(tokens)
        return list(self._fetch(hidden, n)), self._fetch(logits, n)

    def embed(self, shell, tokens: list[int]) -> np.ndarray:
        placed = self._place(np.asarray(tokens), jnp.int32)
        return self._fetch(_embed(shell, placed), len(tokens))

    def head(self, shell, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        normed, logits = _head(shell, self._place(h, shell.dtype))
        return self._fetch(normed, len(h)), self._fetch(logits, len(h))

    def run_block(self, block, h: np.ndarray) -> np.ndarray:
        dtype = block.attention_norm.weight.dtype
        run = _compiled(self.args, jnp.dtype(dtype))[1]
        return self._fetch(run(block, self._place(h, dtype)), len(h))

    def pieces(self, block, inputs: Pieces) -> Pieces:
        """Each piece of the block run on its given input (teacher forcing)."""
        dtype = block.attention_norm.weight.dtype
        placed = {name: self._place(value, dtype) for name, value in inputs.items()}
        out = _compiled(self.args, jnp.dtype(dtype))[0](block, placed)
        n = len(inputs["block"])
        return {name: self._fetch(value, n) for name, value in out.items()}


@eqx.filter_jit
def _embed(shell, tokens):
    return shell.embed(tokens)


@eqx.filter_jit
def _head(shell, h):
    return shell.head(h)


@functools.cache
def _compiled(args, dtype):
    """The jitted pieces and block for one config and dtype, closing over the model's
    shape-only skeleton (for its own `rotary`): compiled once per process, not per runner."""
    shape_only = skeleton(args, dtype)
    return (
        eqx.filter_jit(functools.partial(_pieces, shape_only)),
        eqx.filter_jit(functools.partial(_block, shape_only)),
    )


def _block(shape_only, block, x):
    positions = jnp.arange(x.shape[0])
    cos, sin = shape_only.rotary(positions)
    return block(x, cos, sin, positions)[0]


def _pieces(shape_only, block, x):
    positions = jnp.arange(x["block"].shape[0])
    cos, sin = shape_only.rotary(positions)
    return {
        "attention_norm": block.attention_norm(x["attention_norm"]),
        "attention": block.attention(x["attention"], cos, sin, positions)[0],
        "ffn_norm": block.ffn_norm(x["ffn_norm"]),
        "feed_forward": block.feed_forward(x["feed_forward"]),
        "block": block(x["block"], cos, sin, positions)[0],
    }
