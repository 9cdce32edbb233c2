"""Per-layer drift of the port against the reference, free-running and teacher-forced, with
the reference's own bf16 noise floor (DESIGN.md §5).

One pass over the blocks; at block i both models' block i is loaded in fp32 and bf16 and run on:
  R32, R16  the reference's free-running states (fp32, bf16);
  P32, P16  the port's free-running states;
  T32, T16  the port's block fed the reference's previous state (teacher forcing), compared with
            the reference's block on the very same input, so only block i can differ;
  F16       the reference's bf16 block fed the fp32 reference's previous state: against R32 it is
            the bf16 noise floor of one block (the yardstick for T16).
"""

import numpy as np

from verify.metrics import relative_l2, state_metrics
from verify.runners import JaxLayers, TorchLayers

STREAMS = ("R32", "R16", "P32", "P16")


def layer_drift(
    reference: TorchLayers,
    port: JaxLayers,
    prompts: list[list[int]],
    dtype: str,
    peer: dict[str, list[list[np.ndarray]]] | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per-layer entries (embeddings, every block, final norm) and each stream's logits.

    `peer[dtype][prompt]`: a third implementation's L+1 hidden states (embeddings, after each
    block but the last, final norm), compared free-running where they exist.
    """
    n_layers = reference.args.n_layers

    def peer_at(k: int) -> dict | None:
        return None if peer is None else {d: [p[k] for p in per] for d, per in peer.items()}

    state = {
        "R32": [reference.embed(p, "float32") for p in prompts],
        "R16": [reference.embed(p, "bfloat16") for p in prompts],
        "P32": [port.embed(p, "float32") for p in prompts],
        "P16": [port.embed(p, "bfloat16") for p in prompts],
    }
    entries = [_entry("embeddings", None, state, None, dtype, peer_at(0))]
    for i in range(n_layers):
        blocks = {
            "R32": (reference, reference.block(i, "float32"), "float32"),
            "R16": (reference, reference.block(i, "bfloat16"), "bfloat16"),
            "P32": (port, port.block(i, "float32"), "float32"),
            "P16": (port, port.block(i, "bfloat16"), "bfloat16"),
        }

        def run(stream, inputs, blocks=blocks):
            runner, block, block_dtype = blocks[stream]
            return [runner.run_block(block, h, block_dtype) for h in inputs]

        forced = {
            "T32": run("P32", state["R32"]),
            "T16": run("P16", state["R16"]),
            "F16": run("R16", state["R32"]),
        }
        state = {stream: run(stream, state[stream]) for stream in STREAMS}
        peer_block = peer_at(i + 1) if i < n_layers - 1 else None  # the peer's last is normed
        entries.append(_entry(f"block {i}", i, state, forced, dtype, peer_block))
        del blocks, run  # free this block's weights before the next block is read
    heads = {
        "R32": (reference, "float32"),
        "R16": (reference, "bfloat16"),
        "P32": (port, "float32"),
        "P16": (port, "bfloat16"),
    }
    logits = {}
    normed = {}
    for stream, (runner, stream_dtype) in heads.items():
        outs = runner.head(state[stream], stream_dtype)
        normed[stream] = [o[0] for o in outs]
        logits[stream] = np.concatenate([o[1] for o in outs])
    entries.append(_entry("final norm", None, normed, None, dtype, peer_at(n_layers)))
    return entries, logits


def _entry(
    name: str,
    index: int | None,
    state: dict,
    forced: dict | None,
    dtype: str,
    peer: dict | None = None,
) -> dict:
    cat = {k: np.concatenate(v) for k, v in state.items()}
    port, ref = ("P16", "R16") if dtype == "bfloat16" else ("P32", "R32")
    floor = relative_l2(cat["R16"], cat["R32"])
    entry = {
        "name": name,
        "index": index,
        "free": state_metrics(cat[port], cat[ref]),
        "noise_floor": floor,
        "bf16_error_over_floor": _ratio(relative_l2(cat["P16"], cat["R32"]), floor),
        "fp32_rel_l2": relative_l2(cat["P32"], cat["R32"]),
    }
    if peer is not None:
        hf = {d: np.concatenate(v) for d, v in peer.items()}
        entry |= {
            "peer_rel_l2": relative_l2(hf[dtype], cat[ref]),
            "peer_bf16_error_over_floor": _ratio(relative_l2(hf["bfloat16"], cat["R32"]), floor),
            "peer_fp32_rel_l2": relative_l2(hf["float32"], cat["R32"]),
        }
    if forced is not None:
        f = {k: np.concatenate(v) for k, v in forced.items()}
        tf_floor = relative_l2(f["F16"], cat["R32"])
        forced_port = f["T16"] if dtype == "bfloat16" else f["T32"]
        entry |= {
            "teacher_forced": state_metrics(forced_port, cat[ref]),
            "teacher_forced_noise_floor": tf_floor,
            "teacher_forced_bf16_over_floor": _ratio(relative_l2(f["T16"], cat["R16"]), tf_floor),
            "teacher_forced_fp32_rel_l2": relative_l2(f["T32"], cat["R32"]),
        }
    return entry


def _ratio(error: float, floor: float) -> float:
    return error / floor if floor > 0 else (0.0 if error == 0 else float("inf"))
