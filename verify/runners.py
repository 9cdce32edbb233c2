"""Both models, driven one block at a time, so verify can feed any block any input
(teacher forcing) and hold only one block of each model in memory (`--stream-layers`).

`TorchLayers` reads the reference's weights with torch's own loaders (mmap'd), `JaxLayers`
reads the converted folder with `checkpoint`'s readers: two independent paths to the bytes.
Hidden states cross between them as float32 numpy arrays (exact for bf16 values).
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from checkpoint.args import ModelArgs
from checkpoint.folder import open_folder
from model_jax.loading import make_getter
from model_jax.model import Linear, RMSNorm, TransformerBlock
from model_jax.rope import rotary_angles
from reference_torch import model as torch_model
from reference_torch.loading import read_state_dict
from reference_torch.rope import freqs_cis

JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class _PreadState:
    """name → torch tensor, each read with plain reads when asked for (bounded memory)."""

    def __init__(self, folder: Path):
        self.records = open_folder(folder).tensors

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, name: str) -> torch.Tensor:
        array = self.records[name].read()
        if array.dtype.name == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


class TorchLayers:
    """The reference (official folder), block by block.

    By default the weights come through torch's own loader (`torch.load(weights_only=True,
    mmap=True)` / safetensors), independent of the port's reader. With `stream=True` they are
    read tensor by tensor with plain reads, so no mapping of the whole file stays resident.
    """

    def __init__(self, folder: Path, device: str, *, stream: bool = False):
        self.state = _PreadState(Path(folder)) if stream else read_state_dict(Path(folder))[0]
        self.args = ModelArgs.from_json(Path(folder) / "params.json")
        self.device = device

    def _weight(self, name: str, dtype: str) -> torch.Tensor:
        return self.state[name].to(device=self.device, dtype=TORCH_DTYPES[dtype])

    def embed(self, tokens: list[int], dtype: str) -> np.ndarray:
        table = self.state["tok_embeddings.weight"]
        return _to_numpy(table[torch.tensor(tokens)].to(TORCH_DTYPES[dtype]))

    def block(self, i: int, dtype: str) -> torch.nn.Module:
        with torch.device("meta"):
            block = torch_model.TransformerBlock(self.args)
        prefix = f"layers.{i}."
        state = {
            k[len(prefix) :]: self._weight(k, dtype) for k in self.state if k.startswith(prefix)
        }
        block.load_state_dict(state, strict=True, assign=True)
        return block

    @torch.inference_mode()
    def run_block(self, block, h: np.ndarray, dtype: str) -> np.ndarray:
        positions = torch.arange(h.shape[0], device=self.device)
        cis = freqs_cis(positions, self.args.head_dim, self.args.rope_theta)
        x = torch.from_numpy(h).to(device=self.device, dtype=TORCH_DTYPES[dtype])[None]
        return _to_numpy(block(x, cis, positions)[0][0])

    @torch.inference_mode()
    def head(self, states: list[np.ndarray], dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Final norm and fp32 logits of each prompt's last block output (weights read once)."""
        norm = torch_model.RMSNorm(self.args.dim, self.args.norm_eps).to(self.device)
        norm.weight.data = self._weight("norm.weight", dtype)
        output = self._weight("output.weight", dtype)
        results = []
        for h in states:
            normed = norm(torch.from_numpy(h).to(device=self.device, dtype=TORCH_DTYPES[dtype]))
            logits = torch.nn.functional.linear(normed, output)
            results.append((_to_numpy(normed), _to_numpy(logits.float())))
        return results


class JaxLayers:
    """The port (converted folder), block by block."""

    def __init__(self, folder: Path, device: jax.Device, mesh: Mesh | None = None):
        checkpoint = open_folder(folder)
        self.args, self.records, self.device = checkpoint.args, checkpoint.tensors, device
        self.mesh = mesh  # weights sharded over it; activations follow (XLA SPMD)

    def _get(self, dtype: str):
        return make_getter(self.records, self.args, JAX_DTYPES[dtype], self.mesh)

    def embed(self, tokens: list[int], dtype: str) -> np.ndarray:
        table = self.records["tok_embeddings.weight"].array()
        return np.asarray(jnp.asarray(table[np.asarray(tokens)], JAX_DTYPES[dtype]), np.float32)

    def block(self, i: int, dtype: str) -> TransformerBlock:
        return TransformerBlock.load(self.args, self._get(dtype), f"layers.{i}.")

    def _place(self, h: np.ndarray, dtype: str) -> jax.Array:
        """Activations on the device, or replicated over the mesh the weights are sharded on."""
        where = self.device if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        return jax.device_put(jnp.asarray(h, JAX_DTYPES[dtype]), where)

    def run_block(self, block, h: np.ndarray, dtype: str) -> np.ndarray:
        x = self._place(h, dtype)
        return np.asarray(
            _jax_block(block, x, self.args.head_dim, self.args.rope_theta), np.float32
        )

    def head(self, states: list[np.ndarray], dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Final norm and fp32 logits of each prompt's last block output (weights read once)."""
        get = self._get(dtype)
        norm, output = RMSNorm(get("norm.weight"), self.args.norm_eps), Linear(get("output.weight"))
        results = []
        for h in states:
            normed, logits = _jax_head(norm, output, self._place(h, dtype))
            results.append((np.asarray(normed, np.float32), np.asarray(logits)))
        return results


@eqx.filter_jit
def _jax_block(block, x, head_dim, theta):
    positions = jnp.arange(x.shape[0])
    cos, sin = rotary_angles(positions, head_dim, theta)
    return block(x, cos, sin, positions)[0]


@eqx.filter_jit
def _jax_head(norm, output, x):
    normed = norm(x)
    return normed, output(normed).astype(jnp.float32)
