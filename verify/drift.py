"""Free-running drift and teacher-forced per-piece errors of the port (DESIGN.md §5).

Streams: R32/R16 the reference in fp32/bf16, P32/P16 the port, each free-running on its own
outputs. The streams in the verified dtype come from each whole model's own `forward_hidden`
(one model resident at a time, `whole_model_states`); the others, and all of them with
`--stream-layers`, are computed here block by block.

Teacher forcing, at every block and for every piece of it (`verify.runners.PIECES`):
- bf16: the reference's bf16 block runs on its own state; the input of each of its pieces is
  recorded and fed to the same piece of the port (bf16) and of the reference in fp32. The fp32
  output is the truth both bf16 outputs are measured against (`ErrorSums`, scale-aware), so
  `port16 ÷ ref16` says how much less accurate the port is than the reference's own bf16.
- fp32: the same with the reference's fp32 pieces and inputs; the port must match to ~1e-7.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from checkpoint.errors import CheckpointError
from verify.metrics import ErrorSums, StateMetrics, error_scale, state_metrics
from verify.runners import PIECES, JaxRunner, TorchRunner

States = dict[str, list[np.ndarray]]  # stream → one array per prompt


def streams_for(dtype: str) -> dict[str, str]:
    """Stream name → dtype: fp32 always, bf16 too when verifying bf16."""
    if dtype == "bfloat16":
        return {"R16": "bfloat16", "R32": "float32", "P16": "bfloat16", "P32": "float32"}
    return {"R32": "float32", "P32": "float32"}


@dataclasses.dataclass
class PieceSums:
    """One piece of one block on one prompt, teacher-forced."""

    port16: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # vs fp32 ref, bf16 input
    ref16: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # the reference's own
    port32: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # vs fp32 ref, fp32 input


@dataclasses.dataclass
class FreeSums:
    """One layer on one prompt, free-running, against the fp32 reference."""

    ref16: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # the bf16 noise floor
    port16: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    port32: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    peer16: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    peer32: ErrorSums = dataclasses.field(default_factory=ErrorSums)


@dataclasses.dataclass
class LayerSums:
    name: str
    index: int | None  # block index; None for embeddings and final norm
    free: StateMetrics  # port vs reference in the verified dtype, all prompts pooled
    free_prompts: list[FreeSums]
    pieces: dict[str, list[PieceSums]]  # piece → per prompt (blocks only)


@dataclasses.dataclass
class Drift:
    layers: list[LayerSums]  # embeddings, every block, final norm
    logits: States  # stream → per prompt, fp32 logits


def whole_model_states(
    runner: TorchRunner | JaxRunner,
    dtype: str,
    prompts: list[list[int]],
    then: Callable | None = None,
) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Per prompt: the L+2 hidden states and the logits, from the model's own forward.
    `then(model)` runs while the model is still loaded (generation)."""
    model = runner.model(dtype)
    hidden, logits = zip(*(runner.forward_hidden(model, p) for p in prompts), strict=True)
    if then is not None:
        then(model)
    return list(hidden), list(logits)


def drift(
    ref: TorchRunner,
    port: JaxRunner,
    prompts: list[list[int]],
    dtype: str,
    whole: dict[str, tuple] | None = None,
    peer: dict[str, list[list[np.ndarray]]] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> Drift:
    """Every layer's free-running metrics and every block's teacher-forced piece errors.

    `whole[stream]`: `whole_model_states` of the streams in `dtype` (the others, and all of
    them when `whole` is None, run block by block here).
    `peer[dtype][prompt]`: a third implementation's L+1 hidden states (embeddings, after each
    block but the last, final norm), compared free-running where they exist.
    """
    streams = streams_for(dtype)
    runners = {s: ref if s[0] == "R" else port for s in streams}
    whole = whole or {}
    stepped = [s for s in streams if s not in whole]  # computed block by block here
    n_layers, bf16 = ref.args.n_layers, dtype == "bfloat16"

    def current(k: int, stepped_states: States) -> States:
        return {s: [h[k] for h in whole[s][0]] for s in whole} | stepped_states

    def peer_at(k: int) -> dict | None:
        return None if peer is None else {d: [p[k] for p in per] for d, per in peer.items()}

    embedded = {}
    for s in stepped:  # one embedding table at a time; the head is read again at the end
        shell = runners[s].shell(streams[s])
        embedded[s] = [runners[s].embed(shell, p) for p in prompts]
        del shell
    states = current(0, embedded)
    _check_reference(ref, states, "the embeddings")
    layers = [_layer("embeddings", None, states, dtype, {}, peer_at(0))]
    for i in range(n_layers):
        blocks = {s: runners[s].block(i, d) for s, d in streams.items()}
        pieces = {name: [PieceSums() for _ in prompts] for name in PIECES}
        following: States = {s: [] for s in stepped}
        for j in range(len(prompts)):
            if bf16:
                inputs16, outputs16 = ref.traced(blocks["R16"], states["R16"][j])
                truth = ref.pieces(blocks["R32"], inputs16)
                port16 = port.pieces(blocks["P16"], inputs16)
                for name, sums in pieces.items():
                    scale = error_scale(truth[name])
                    sums[j].port16.add(port16[name], truth[name], scale)
                    sums[j].ref16.add(outputs16[name], truth[name], scale)
                _append(following, "R16", outputs16["block"])
            inputs32, outputs32 = ref.traced(blocks["R32"], states["R32"][j])
            port32 = port.pieces(blocks["P32"], inputs32)
            for name, sums in pieces.items():
                sums[j].port32.add(port32[name], outputs32[name])
            _append(following, "R32", outputs32["block"])
            for s in {"P16", "P32"} & set(stepped):
                following[s].append(port.run_block(blocks[s], states[s][j]))
        states = current(i + 1, following)
        _check_reference(ref, states, f"block {i}")
        peer_block = peer_at(i + 1) if i < n_layers - 1 else None  # the peer's last is normed
        layers.append(_layer(f"block {i}", i, states, dtype, pieces, peer_block))
        del blocks  # this block's weights go before the next block is read
        if on_block is not None:
            on_block(i)
    heads = {}
    for s in stepped:
        shell = runners[s].shell(streams[s])
        heads[s] = [runners[s].head(shell, h) for h in states[s]]
        del shell
    normed = current(n_layers + 1, {s: [h[0] for h in heads[s]] for s in stepped})
    logits = {s: whole[s][1] for s in whole} | {s: [h[1] for h in heads[s]] for s in stepped}
    _check_reference(ref, normed, "the final norm")
    _check_reference(ref, logits, "the logits")
    layers.append(_layer("final norm", None, normed, dtype, {}, peer_at(n_layers)))
    return Drift(layers, logits)


def _append(states: States, stream: str, value: np.ndarray) -> None:
    if stream in states:
        states[stream].append(value)


def free_sums(states: States, peer: dict | None = None) -> list[FreeSums]:
    """Per prompt, every stream (and the peer) against the fp32 reference."""
    out = []
    for j, truth in enumerate(states["R32"]):
        sums, scale = FreeSums(), error_scale(truth)
        sums.port32.add(states["P32"][j], truth, scale)
        if "R16" in states:
            sums.ref16.add(states["R16"][j], truth, scale)
            sums.port16.add(states["P16"][j], truth, scale)
        if peer is not None:
            sums.peer32.add(peer["float32"][j], truth, scale)
            sums.peer16.add(peer["bfloat16"][j], truth, scale)
        out.append(sums)
    return out


def _check_reference(ref: TorchRunner, states: States, where: str) -> None:
    """A reference that is itself non-finite is bad input, not a verdict on the port."""
    for s, per_prompt in states.items():
        for j, x in enumerate(per_prompt):
            if s[0] == "R" and not np.isfinite(x).all():
                raise CheckpointError(
                    ref.loader.folder,
                    f"the reference's own {'bf16' if s == 'R16' else 'fp32'} output at {where} "
                    f"is not finite on prompt {j + 1} (it overflows; cannot judge the port)",
                )


def _layer(
    name: str,
    index: int | None,
    states: States,
    dtype: str,
    pieces: dict[str, list[PieceSums]],
    peer: dict | None,
) -> LayerSums:
    port, ref = ("P16", "R16") if dtype == "bfloat16" else ("P32", "R32")
    free = free_sums(states, peer)
    pooled = state_metrics(np.concatenate(states[port]), np.concatenate(states[ref]))
    return LayerSums(name, index, pooled, free, pieces)
