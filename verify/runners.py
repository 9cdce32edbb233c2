"""The torch reference and the JAX port as `verify.implementation.Implementation`s: driven only
through the pieces their own forward is made of (`embed`, the scan's groups of blocks, each
block's declared pieces, `head`), so what verify judges is the code users run.

`TorchRunner` reads the reference's weights with torch's own readers
(`reference_torch.loading`), `JaxRunner` the converted folder with the port's loader
(`model_jax.loading`): two independent paths to the bytes. Neither knows which pieces a block
has: each asks its block (`pieces()`), so a new kind of block is judged piece by piece with no
change here.
"""

import functools
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import model_jax
import model_jax.model as jax_model
import reference_torch
from checkpoint.dtypes import jax_dtype, torch_dtype
from checkpoint.pieces import BLOCK_INPUT, BLOCK_OUTPUT, recorded, run_pieces
from checkpoint.spec import vocab_table
from model_jax.generate import bucket
from model_jax.loading import PortLoader, skeleton
from reference_torch.loading import ReferenceLoader
from verify.expert_stream import ExpertStream
from verify.implementation import WHOLE_BLOCK, PieceOutputs, Values, judge_apart
from verify.vocab import head_rows


def padded_length(n: int) -> int:
    """The JAX side pads sequences to a few lengths, so prompts share compilations: powers of
    two from 8 up to 512, then multiples of 256 (≤ 2× the work)."""
    return bucket(n, 8) if n <= 512 else -(-n // 256) * 256


class Group(NamedTuple):
    """One scan step's blocks as an implementation holds them, and their compute dtype;
    `layers`: their layer numbers where their routed experts are read on demand (streamed
    within a layer), else empty."""

    blocks: Any
    dtype: Any
    layers: tuple[int, ...] = ()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """Floats as float32 (exact for bf16) or float64, integers as they are; the batch axis
    dropped."""
    t = t.detach()[0]
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()
    return t.cpu().numpy()


class TorchRunner:
    """The reference (official folder)."""

    def __init__(self, folder: Path, device: str, streamed: bool = False):
        """`streamed`: blocks hold their routed experts' weights only while they run, and the
        vocabulary tables are read in parts (`verify.vocab`)."""
        self.loader = ReferenceLoader(folder)
        self.args, self.device, self.streamed = self.loader.args, device, streamed
        self.vocab_rows = _vocab_rows(self.args, self.loader.roles.quantized, streamed)

    def model(self, dtype: str) -> reference_torch.Transformer:
        return self.loader.model(dtype=dtype, device=self.device)

    def shell(
        self, part: str, dtype: str, rows: list[int] | None = None
    ) -> reference_torch.Transformer:
        return self.loader.shell(part, dtype=dtype, device=self.device, rows=rows)

    def group(self, g: int, dtype: str) -> Group:
        blocks = [
            self.loader.block(i, dtype=dtype, device=self.device, stream_experts=self.streamed)
            for i in self.args.layer_groups[g]
        ]
        return Group(blocks, torch_dtype(dtype))

    def _tensor(self, x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """x on the device with a batch axis: floats in `dtype`, integers as they are."""
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return (t.to(dtype) if t.is_floating_point() else t)[None]

    def _context(self, n: int, dtype: torch.dtype, start: int) -> dict:
        """What the model's own forward gives every block: its `rotary` at start…start+n-1."""
        positions = torch.arange(start, start + n, device=self.device)
        rope = _shape_only(self.args, dtype).rotary(positions)
        return {"rope": rope, "positions": positions, "cached": None}

    @torch.inference_mode()
    def forward_hidden(
        self, model, tokens: list[int], start: int = 0
    ) -> tuple[list[np.ndarray], np.ndarray]:
        logits, hidden = model.forward_hidden(
            torch.tensor([tokens], device=self.device), start=start
        )
        return [_numpy(h) for h in hidden], _numpy(logits)

    @torch.inference_mode()
    def embed(self, shell, tokens: list[int]) -> np.ndarray:
        return _numpy(shell.embed(torch.tensor([tokens], device=self.device)))

    @torch.inference_mode()
    def head(self, shell, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        normed, logits = shell.head(self._tensor(h, shell.norm.weight.dtype))
        return _numpy(normed), _numpy(logits)

    @torch.inference_mode()
    def run_group(self, group, h: np.ndarray, start: int = 0) -> list[np.ndarray]:
        context = self._context(len(h), group.dtype, start)
        x = self._tensor(h, group.dtype)
        outs = []
        for block in group.blocks:
            x = block(x, context["rope"], context["positions"])[0]
            outs.append(_numpy(x))
        return outs

    @torch.inference_mode()
    def trace(self, group, k: int, x: np.ndarray, start: int = 0) -> Values:
        block = group.blocks[k]
        inputs = {BLOCK_INPUT: self._tensor(x, group.dtype)}
        values = run_pieces(block.pieces(), inputs | self._context(len(x), group.dtype, start))
        return {name: _numpy(value) for name, value in recorded(values).items()}

    @torch.inference_mode()
    def pieces(self, group, k: int, values: Values, start: int = 0) -> PieceOutputs:
        block = group.blocks[k]
        given = {name: self._tensor(value, group.dtype) for name, value in values.items()}
        given |= self._context(len(values[BLOCK_INPUT]), group.dtype, start)
        out = {p.name: p(given) for p in block.pieces() if p.judged}
        whole = block(given[BLOCK_INPUT], given["rope"], given["positions"])[0]
        out[WHOLE_BLOCK] = {BLOCK_OUTPUT: whole}
        return {name: {o: _numpy(v) for o, v in outputs.items()} for name, outputs in out.items()}


def _vocab_rows(args, quantized: tuple[str, ...], streamed: bool) -> int | None:
    """`Implementation.vocab_rows`: streamed, `verify.vocab.head_rows` (all of them where the
    float64 head is small), unless a vocabulary table is stored in FP8 (read whole, as its
    scales are)."""
    tables = {f"{vocab_table(args, part)}.weight" for part in ("embed", "head")}
    return head_rows(args) if streamed and not tables & set(quantized) else None


@functools.cache
def _shape_only(args, dtype: torch.dtype) -> reference_torch.Transformer:
    """The reference on the meta device in `dtype`: its `rotary` needs the config only."""
    with torch.device("meta"):
        return reference_torch.Transformer(args).to(dtype)


class JaxRunner:
    """The port (converted folder), on JAX's default device; with a mesh, weights sharded and
    activations replicated. Sequences are padded at the end to a length bucket (the model is
    causal: padding cannot change earlier positions), so prompts of similar lengths share one
    compilation, as `model_jax.generate` does."""

    def __init__(self, folder: Path, mesh: Mesh | None = None, streamed: bool = False):
        """`streamed`: fine-grained MoE blocks read their routed experts a few at a time
        while they run (`verify.expert_stream`), and the vocabulary tables are read in parts
        (`verify.vocab`)."""
        self.loader = PortLoader(folder)
        self.args, self.mesh = self.loader.args, mesh
        self.experts = ExpertStream(self.loader, mesh) if streamed else None
        quantized = self.loader.checkpoint.roles.quantized
        self.vocab_rows = _vocab_rows(self.args, quantized, streamed)

    def model(self, dtype: str) -> model_jax.Transformer:
        return self.loader.model(dtype=dtype, mesh=self.mesh)

    def shell(self, part: str, dtype: str, rows: list[int] | None = None) -> model_jax.Transformer:
        return self.loader.shell(part, dtype=dtype, mesh=self.mesh, rows=rows)

    def group(self, g: int, dtype: str) -> Group:
        routed = self.experts is None
        blocks = self.loader.group(g, dtype=dtype, mesh=self.mesh, routed_experts=routed)
        streamed = not routed and blocks.moe is not None
        layers = tuple(self.args.layer_groups[g]) if streamed else ()
        return Group(blocks, jnp.dtype(jax_dtype(dtype)), layers)

    def _block(self, group: Group, k: int):
        return jax_model.group_block(group.blocks, k, self.args.window_pattern[k])

    def _place(self, x: np.ndarray, dtype) -> jax.Array:
        """x on the device (replicated over the mesh), padded to its length bucket; floats in
        `dtype` (cast on the host: no device program per shape), integers as int32."""
        dtype = jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32
        padded = np.zeros((padded_length(x.shape[0]), *x.shape[1:]), dtype)
        padded[: x.shape[0]] = x
        if self.mesh is None:  # on the default device, as the model's own callers place it
            return jax.device_put(padded)
        return jax.device_put(padded, NamedSharding(self.mesh, PartitionSpec()))

    @staticmethod
    def _fetch(x: jax.Array, n: int) -> np.ndarray:
        x = np.asarray(x)
        return (x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x)[:n]

    def forward_hidden(
        self, model, tokens: list[int], start: int = 0
    ) -> tuple[list[np.ndarray], np.ndarray]:
        placed = self._place(np.asarray(tokens), jnp.int32)
        logits, hidden = model.forward_hidden(placed, jnp.int32(start))
        n = len(tokens)
        return [self._fetch(h, n) for h in hidden], self._fetch(logits, n)

    def embed(self, shell, tokens: list[int]) -> np.ndarray:
        placed = self._place(np.asarray(tokens), jnp.int32)
        return self._fetch(_embed(shell, placed), len(tokens))

    def head(self, shell, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        normed, logits = _head(shell, self._place(h, shell.dtype))
        return self._fetch(normed, len(h)), self._fetch(logits, len(h))

    def run_group(self, group, h: np.ndarray, start: int = 0) -> list[np.ndarray]:
        placed = self._place(h, group.dtype)
        compiled = _compiled(self.args, group.dtype)
        if not group.layers:
            outs = compiled.run_group(group.blocks, placed, jnp.int32(start))
            return [self._fetch(out, len(h)) for out in outs]
        outs = []
        for k, layer in enumerate(group.layers):
            given = {BLOCK_INPUT: placed} | compiled.context(placed.shape[0], jnp.int32(start))
            placed = self.experts.run(self._block(group, k), layer, given, len(h))[BLOCK_OUTPUT]
            outs.append(self._fetch(placed, len(h)))
        return outs

    def trace(self, group, k: int, x: np.ndarray, start: int = 0) -> Values:
        placed = self._place(x, group.dtype)
        compiled = _compiled(self.args, group.dtype)
        if not group.layers:
            values = compiled.trace(group.blocks, k, placed, jnp.int32(start))
        else:
            given = {BLOCK_INPUT: placed} | compiled.context(placed.shape[0], jnp.int32(start))
            values = recorded(
                self.experts.run(self._block(group, k), group.layers[k], given, len(x))
            )
        return {name: self._fetch(value, len(x)) for name, value in values.items()}

    def pieces(self, group, k: int, values: Values, start: int = 0) -> PieceOutputs:
        placed = {name: self._place(value, group.dtype) for name, value in values.items()}
        compiled = _compiled(self.args, group.dtype)
        n = len(values[BLOCK_INPUT])
        if not group.layers:
            out = compiled.pieces(group.blocks, k, placed, jnp.int32(start))
        else:
            out = self._streamed_pieces(
                group,
                k,
                placed,
                compiled.context(placed[BLOCK_INPUT].shape[0], jnp.int32(start)),
                n,
            )
        return {name: {o: self._fetch(v, n) for o, v in outputs.items()} for name, outputs in out}

    def judge(
        self, group, values: list[Values], h: np.ndarray | None, start: int = 0
    ) -> tuple[list[PieceOutputs], list[np.ndarray] | None]:
        """`verify.implementation.judge` in one compiled call: XLA's CPU bf16 dot converts
        the weights to fp32 in every call, so once here instead of twice."""
        if group.layers:  # routed experts streamed: one call per part of them anyway
            return judge_apart(self, group, values, h, start)
        compiled = _compiled(self.args, group.dtype)
        n = len(values[0][BLOCK_INPUT])
        placed = [{name: self._place(v, group.dtype) for name, v in per.items()} for per in values]
        free = None if h is None else self._place(h, group.dtype)
        outs, run = compiled.judge(group.blocks, placed, free, jnp.int32(start))
        pieces = [
            {name: {o: self._fetch(v, n) for o, v in outputs.items()} for name, outputs in out}
            for out in outs
        ]
        return pieces, None if run is None else [self._fetch(x, len(h)) for x in run]

    def _streamed_pieces(self, group, k: int, placed: dict, context: dict, n: int) -> list:
        """As `_Compiled.pieces`, the routed experts read on demand."""
        block, layer = self._block(group, k), group.layers[k]
        given = placed | context
        judged = tuple(p.name for p in block.pieces() if p.judged)
        out = self.experts.each(block, layer, given, judged, n)
        whole = self.experts.run(block, layer, {BLOCK_INPUT: placed[BLOCK_INPUT]} | context, n)
        return [*out, (WHOLE_BLOCK, {BLOCK_OUTPUT: whole[BLOCK_OUTPUT]})]


@eqx.filter_jit
def _embed(shell, tokens):
    return shell.embed(tokens)


@eqx.filter_jit
def _head(shell, h):
    return shell.head(h)


class _Compiled:
    """The jitted group, trace and pieces of one config and dtype, each building its `rope`
    context with the model's own `rotary` (on a shape-only skeleton) and taking block k out of
    the group with the forward's own `group_block` (looked up on the module when traced, as
    the forward's scan does)."""

    def __init__(self, args, dtype):
        self.pattern = args.window_pattern
        self.shape_only = skeleton(args, dtype)
        self.run_group = eqx.filter_jit(self._run_group)
        self.trace = eqx.filter_jit(self._trace)
        self.pieces = eqx.filter_jit(self._pieces)
        self.judge = eqx.filter_jit(self._judge)

    def context(self, n: int, start) -> dict:
        positions = start + jnp.arange(n)
        return {"rope": self.shape_only.rotary(positions), "positions": positions, "cached": None}

    def _run_group(self, group, x, start):
        context = self.context(x.shape[0], start)
        return jax_model.run_group(group, self.pattern, x, context["rope"], context["positions"])[0]

    def _block(self, group, k):
        return jax_model.group_block(group, k, self.pattern[k])

    def _trace(self, group, k, x, start):
        block = self._block(group, k)
        values = run_pieces(block.pieces(), {BLOCK_INPUT: x} | self.context(x.shape[0], start))
        return recorded(values)

    def _judge(self, group, values, h, start):
        outs = [self._pieces(group, k, v, start) for k, v in enumerate(values)]
        return outs, None if h is None else self._run_group(group, h, start)

    def _pieces(self, group, k, values, start):
        block = self._block(group, k)
        given = values | self.context(values[BLOCK_INPUT].shape[0], start)
        out = [(p.name, p(given)) for p in block.pieces() if p.judged]  # a list keeps the order
        whole = block(given[BLOCK_INPUT], given["rope"], given["positions"])[0]
        return [*out, (WHOLE_BLOCK, {BLOCK_OUTPUT: whole})]


@functools.cache
def _compiled(args, dtype) -> _Compiled:
    """Compiled once per process and config, not per runner."""
    return _Compiled(args, dtype)
