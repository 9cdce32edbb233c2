"""Free-running drift and teacher-forced per-piece errors of the port (`docs/verification.md`).

Streams: R32/R16 the reference in fp32/bf16, P32/P16 the port, each free-running on its own
outputs. The streams in the verified dtype come from each whole model's own `forward_hidden`
(one model resident at a time, `whole_model_states`); the others, and all of them with
`--stream-layers`, are computed here group by group through each implementation's own
`run_group`.

Teacher forcing, group by group (the forward's scan steps) and for every piece each block
declares (`checkpoint.pieces`), one implementation and dtype resident at a time:
- bf16: the reference's bf16 block runs on its own state and records every value; each piece
  of the port (bf16) and of the reference in fp32 is fed the recorded inputs of that piece.
  The fp32 output is the truth both bf16 outputs are measured against (`ErrorSums`,
  scale-aware), so `port16 ÷ ref16` says how much less accurate the port is than the
  reference's own bf16.
- fp32: the same with the reference's fp32 run; the port must match it to ~1e-7.
Integer outputs (a router's chosen experts) are counted as disagreeing tokens (`MismatchSums`).
Free-running in bf16, a token some router could have sent to other experts on rounding alone
(`verify/routing.py`) is left out of the bf16 sums from that block on, and counted.
"""

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from checkpoint.errors import CheckpointError
from checkpoint.pieces import BLOCK_OUTPUT
from verify.implementation import WHOLE_BLOCK, Implementation, PieceOutputs, Values, judge
from verify.metrics import ErrorSums, MismatchSums, StateMetrics, error_scale, state_metrics
from verify.routing import fragile_tokens
from verify.vocab import embed_prompts, head_states

States = dict[str, list[np.ndarray]]  # stream → one array per prompt
REFERENCE_STREAMS = ("R16", "R32", "R64")
PORT_STREAMS = ("P16", "P32")


def streams_for(dtype: str) -> dict[str, str]:
    """Stream name → dtype: fp32 always, bf16 too when verifying bf16, and the reference in
    float64 (the truth fp32 is judged against)."""
    streams = {"R32": "float32", "P32": "float32", "R64": "float64"}
    if dtype == "bfloat16":
        streams |= {"R16": "bfloat16", "P16": "bfloat16"}
    return streams


@dataclasses.dataclass
class PieceSums:
    """One piece of one block on one prompt, teacher-forced."""

    port16: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # vs fp32 ref, bf16 input
    ref16: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # the reference's own
    port32: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # vs fp32 ref, fp32 input
    # Integer outputs: tokens whose values differ from the truth (bf16) or the reference (fp32).
    port16_mismatch: MismatchSums = dataclasses.field(default_factory=MismatchSums)
    ref16_mismatch: MismatchSums = dataclasses.field(default_factory=MismatchSums)
    port32_mismatch: MismatchSums = dataclasses.field(default_factory=MismatchSums)
    rerouted: int = 0  # tokens left out of the whole block's bf16 sums (verify/routing.py)


@dataclasses.dataclass
class FreeSums:
    """One layer on one prompt, free-running, against the fp32 reference."""

    ref16: ErrorSums = dataclasses.field(default_factory=ErrorSums)  # the bf16 noise floor
    port16: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    port32: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    peer16: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    peer32: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    # Against the float64 reference: the fp32 noise floor, and the port's fp32 error.
    ref32_64: ErrorSums = dataclasses.field(default_factory=ErrorSums)
    port32_64: ErrorSums = dataclasses.field(default_factory=ErrorSums)


@dataclasses.dataclass
class LayerSums:
    name: str
    index: int | None  # block index; None for embeddings and final norm
    free: StateMetrics  # port vs reference in the verified dtype, all prompts pooled
    free_prompts: list[FreeSums]
    pieces: dict[str, list[PieceSums]]  # piece → per prompt (blocks only), declared order
    rerouted: int = 0  # tokens left out of the free-running bf16 sums (verify/routing.py)


@dataclasses.dataclass
class Drift:
    layers: list[LayerSums]  # embeddings, every block, final norm
    logits: States  # stream → per prompt, fp32 logits
    # Per prompt, the tokens some router could have sent elsewhere on bf16 rounding alone,
    # left out of the free-running bf16 sums from that block on (verify/routing.py).
    rerouted: list[np.ndarray]


def whole_model_states(
    runner: Implementation,
    dtype: str,
    prompts: list[list[int]],
    starts: list[int],
    then: Callable | None = None,
) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Per prompt (at its start position): the L+2 hidden states and the logits, from the
    model's own forward. `then(model)` runs while the model is still loaded (generation)."""
    model = runner.model(dtype)
    hidden, logits = zip(
        *(runner.forward_hidden(model, p, s) for p, s in zip(prompts, starts, strict=True)),
        strict=True,
    )
    if then is not None:
        then(model)
    return list(hidden), list(logits)


def drift(
    ref: Implementation,
    port: Implementation,
    prompts: list[list[int]],
    dtype: str,
    whole: dict[str, tuple] | None = None,
    peer: dict[str, list[list[np.ndarray]]] | None = None,
    on_block: Callable[[int], None] | None = None,
    starts: list[int] | None = None,
) -> Drift:
    """Every layer's free-running metrics and every block's teacher-forced piece errors.

    `whole[stream]`: `whole_model_states` of the streams in `dtype` (the others, and all of
    them when `whole` is None, run group by group here).
    `peer[dtype][prompt]`: a third implementation's L+1 hidden states (embeddings, after each
    block but the last, final norm), compared free-running where they exist.
    `starts[j]`: the position prompt j's first token sits at (position probes; default 0).
    """
    starts = starts or [0] * len(prompts)
    streams = streams_for(dtype)
    runner_of = {"R16": ref, "R32": ref, "R64": ref, "P16": port, "P32": port}
    whole = whole or {}
    stepped = [s for s in streams if s not in whole]  # computed group by group here
    n_layers, bf16 = ref.args.n_layers, dtype == "bfloat16"

    def current(k: int, stepped_states: States) -> States:
        return {s: [h[k] for h in whole[s][0]] for s in whole} | stepped_states

    def peer_at(k: int) -> dict | None:
        return None if peer is None else {d: [p[k] for p in per] for d, per in peer.items()}

    # one embedding table at a time
    embedded = {s: embed_prompts(runner_of[s], streams[s], prompts) for s in stepped}
    states = current(0, embedded)
    _check_reference(ref, states, "the embeddings")
    rerouted = [np.zeros(len(h), bool) for h in states["R32"]]
    layers = [_layer("embeddings", None, states, dtype, {}, peer_at(0), rerouted)]
    for g, group_layers in enumerate(ref.args.layer_groups):
        run = _GroupRun(ref, port, g, len(group_layers), starts, bf16)
        after = run.forward(states, {s: whole[s][0] for s in whole}, group_layers[0], stepped)
        for k, i in enumerate(group_layers):
            states = current(i + 1, {s: [h[k] for h in after[s]] for s in stepped})
            _check_reference(ref, states, f"block {i}")
            rerouted = [r | f for r, f in zip(rerouted, run.fragile[k], strict=True)]
            peer_block = peer_at(i + 1) if i < n_layers - 1 else None  # the peer's last is normed
            layers.append(_layer(f"block {i}", i, states, dtype, run.sums[k], peer_block, rerouted))
            if on_block is not None:
                on_block(i)
    heads = {s: head_states(runner_of[s], streams[s], states[s]) for s in stepped}
    normed = current(n_layers + 1, {s: [h[0] for h in heads[s]] for s in stepped})
    logits = {s: whole[s][1] for s in whole} | {s: [h[1] for h in heads[s]] for s in stepped}
    _check_reference(ref, normed, "the final norm")
    _check_reference(ref, logits, "the logits")
    layers.append(_layer("final norm", None, normed, dtype, {}, peer_at(n_layers), rerouted))
    return Drift(layers, logits, rerouted)


class _GroupRun:
    """One scan step's blocks judged, holding one implementation in one dtype at a time."""

    def __init__(self, ref, port, g: int, size: int, starts: list[int], bf16: bool):
        self.ref, self.port, self.g, self.bf16 = ref, port, g, bf16
        self.size, self.n_prompts, self.starts = size, len(starts), starts
        self.sums: list[dict[str, list[PieceSums]]] = [{} for _ in range(size)]
        # fragile[k][j]: prompt j's tokens block k's router could re-route on bf16 rounding.
        self.fragile = [[False] * self.n_prompts for _ in range(size)]

    def forward(self, states: States, whole: dict, first: int, stepped: list[str]) -> States:
        """Judge every block of the group; the stepped streams' states after each block."""
        after: States = {s: [] for s in stepped}
        prompts = range(self.n_prompts)
        traced16: list[list[Values]] = []
        if self.bf16:
            traced16 = self._trace("R16", "bfloat16", states, whole, first)
            _extend(after, "R16", _block_outputs(traced16))
        group = self.ref.group(self.g, "float32")
        truth = [
            [self.ref.pieces(group, k, t, start) for t, start in zip(per, self.starts, strict=True)]
            for k, per in enumerate(traced16)
        ]
        traced32 = self._trace_with(group, "R32", states, whole, first)
        del group
        for k, j in itertools.product(self._ks, prompts) if traced16 else ():
            self.fragile[k][j] = _fragile(self.ref.args, traced32[k][j], traced16[k][j])
        _extend(after, "R32", _block_outputs(traced32))
        if "R64" in after:  # free-running only: the truth fp32 is judged against
            group = self.ref.group(self.g, "float64")
            after["R64"] = self._run_group(self.ref, group, states["R64"])
            del group
        for dtype, stream, traced in (("bfloat16", "P16", traced16), ("float32", "P32", traced32)):
            if not traced:
                continue
            group = self.port.group(self.g, dtype)
            judged = [
                judge(
                    self.port,
                    group,
                    [traced[k][j] for k in self._ks],
                    states[stream][j] if stream in after else None,
                    self.starts[j],
                )
                for j in prompts
            ]
            del group
            outputs = [[judged[j][0][k] for j in prompts] for k in self._ks]
            if stream in after:
                after[stream] = [run for _, run in judged]
            for k in self._ks:
                for j in prompts:
                    if stream == "P16":
                        self._add16(k, j, outputs[k][j], traced[k][j], truth[k][j])
                    else:
                        self._add32(k, j, outputs[k][j], traced[k][j])
        return after

    def _run_group(self, runner, group, states: list[np.ndarray]) -> list[list[np.ndarray]]:
        return [
            runner.run_group(group, h, start) for h, start in zip(states, self.starts, strict=True)
        ]

    @property
    def _ks(self) -> range:
        return range(self.size)

    def _trace(self, stream, dtype, states, whole, first) -> list[list[Values]]:
        group = self.ref.group(self.g, dtype)
        traced = self._trace_with(group, stream, states, whole, first)
        del group
        return traced

    def _trace_with(self, group, stream, states, whole, first) -> list[list[Values]]:
        """traced[k][j]: block k's recorded run on prompt j, fed the stream's own state (from
        its whole forward where there is one, else the previous block's traced output)."""
        traced: list[list[Values]] = [[] for _ in self._ks]
        for j in range(self.n_prompts):
            h = states[stream][j]
            for k in self._ks:
                if stream in whole and k > 0:
                    h = whole[stream][j][first + k]
                traced[k].append(self.ref.trace(group, k, h, self.starts[j]))
                h = traced[k][j][BLOCK_OUTPUT]
        return traced

    def _piece_sums(self, k: int, name: str) -> list[PieceSums]:
        return self.sums[k].setdefault(name, [PieceSums() for _ in range(self.n_prompts)])

    def _add16(self, k, j, port: PieceOutputs, traced: Values, truth: PieceOutputs) -> None:
        # The whole block routes on its own bf16 rounding of the attention path, so it may
        # re-route a near-tie: the tokens fragile under the free-running noise (an upper bound
        # of one block's; the router piece itself gets a recorded input and computes in fp32,
        # so its two runs agree exactly) are left out of its bf16 sums (verify/routing.py).
        rerouted = self.fragile[k][j]
        for name, outputs in port.items():
            sums = self._piece_sums(k, name)[j]
            for output, value in outputs.items():
                reference = _reference_output(traced, name, output)
                exact = truth[name][output]
                if _is_integer(exact):
                    scores = f"{output}_scores"  # what it was chosen from (checkpoint.pieces)
                    truth_scores = truth[name].get(scores)
                    sums.port16_mismatch.add(value, exact, outputs.get(scores), truth_scores)
                    sums.ref16_mismatch.add(reference, exact, traced.get(scores), truth_scores)
                    continue
                value, exact, reference = _tokens(value), _tokens(exact), _tokens(reference)
                if name == WHOLE_BLOCK and np.any(rerouted):
                    sums.rerouted += int(np.sum(rerouted))
                    sums.port16.nonfinite += int(np.sum(~np.isfinite(value[rerouted])))
                    value, exact, reference = (a[~rerouted] for a in (value, exact, reference))
                scale = error_scale(exact)
                sums.port16.add(value, exact, scale)
                sums.ref16.add(reference, exact, scale)

    def _add32(self, k, j, port: PieceOutputs, traced: Values) -> None:
        for name, outputs in port.items():
            sums = self._piece_sums(k, name)[j]
            for output, value in outputs.items():
                reference = _reference_output(traced, name, output)
                if _is_integer(reference):
                    scores = f"{output}_scores"
                    sums.port32_mismatch.add(
                        value, reference, outputs.get(scores), traced.get(scores)
                    )
                else:
                    sums.port32.add(_tokens(value), _tokens(reference))


def _fragile(args, truth: Values, noisy: Values) -> np.ndarray | bool:
    """The tokens whose chosen experts (an integer output `X` chosen from `X_scores`) are
    within the reference's own bf16 noise of a tie, in one block's fp32 (`truth`) and bf16
    (`noisy`) free-running traces; False where the block routes nothing."""
    fragile = False
    for name, value in truth.items():
        scores = f"{name}_scores"
        if _is_integer(value) and scores in truth and args.moe is not None:
            fragile = fragile | fragile_tokens(truth[scores], noisy[scores], args.moe)
    return fragile


def _reference_output(traced: Values, piece: str, output: str) -> np.ndarray:
    """The reference's own value of a piece's output in its recorded run."""
    return traced[BLOCK_OUTPUT if piece == WHOLE_BLOCK else output]


def _tokens(x: np.ndarray) -> np.ndarray:
    """One row per token (the sequence axis first), whatever the value's shape."""
    return x.reshape(len(x), -1)


def _is_integer(x: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(x).dtype, np.integer)


def _block_outputs(traced: list[list[Values]]) -> list[list[np.ndarray]]:
    """Per prompt, each block's output in a group's recorded runs (`traced[k][j]`)."""
    return [[per_block[j][BLOCK_OUTPUT] for per_block in traced] for j in range(len(traced[0]))]


def _extend(after: States, stream: str, per_prompt: list[list[np.ndarray]]) -> None:
    """Record a stream's per-prompt states after each block, when it is stepped here."""
    if stream in after:
        after[stream] = per_prompt


def free_sums(
    states: States, peer: dict | None = None, rerouted: list[np.ndarray] | None = None
) -> list[FreeSums]:
    """Per prompt, every stream (and the peer) against the fp32 reference; the bf16 ones
    without the `rerouted` tokens (`Drift.rerouted`)."""
    out = []
    for j, truth in enumerate(states["R32"]):
        sums, scale = FreeSums(), error_scale(truth)
        sums.port32.add(states["P32"][j], truth, scale)
        if "R64" in states:
            exact = states["R64"][j]
            sums.ref32_64.add(truth, exact, scale)
            sums.port32_64.add(states["P32"][j], exact, scale)
        kept = np.ones(len(truth), bool) if rerouted is None else ~rerouted[j]
        if "R16" in states:
            sums.ref16.add(states["R16"][j][kept], truth[kept], scale[kept])
            sums.port16.add(states["P16"][j][kept], truth[kept], scale[kept])
            # A NaN/Inf fails wherever it is, left-out tokens included.
            sums.port16.nonfinite += int(np.sum(~np.isfinite(states["P16"][j][~kept])))
        if peer is not None:
            sums.peer32.add(peer["float32"][j], truth, scale)
            sums.peer16.add(peer["bfloat16"][j][kept], truth[kept], scale[kept])
        out.append(sums)
    return out


def _check_reference(ref: Implementation, states: States, where: str) -> None:
    """A reference that is itself non-finite is bad input, not a verdict on the port."""
    for s, per_prompt in states.items():
        for j, x in enumerate(per_prompt):
            if s in REFERENCE_STREAMS and not np.isfinite(x).all():
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
    rerouted: list[np.ndarray],
) -> LayerSums:
    port, ref = ("P16", "R16") if dtype == "bfloat16" else ("P32", "R32")
    free = free_sums(states, peer, rerouted)
    pooled = state_metrics(np.concatenate(states[port]), np.concatenate(states[ref]))
    return LayerSums(name, index, pooled, free, pieces, int(sum(r.sum() for r in rerouted)))
