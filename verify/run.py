"""`run_verification`: checksums, per-layer drift, logits and generation, judged by gates."""

import concurrent.futures
import contextlib
import dataclasses
import gc
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import torch
from jax.sharding import Mesh

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError
from checkpoint.spec import Roles
from checkpoint.tokenizer import Tokenizer
from convert.check import check_converted
from convert.manifest import sha256_file
from model_jax.generate import check_positions
from reference_torch.latent import softmax_factor
from verify.backends import backend_factor, backend_note, scaled_fp32
from verify.drift import drift, whole_model_states
from verify.gates import (
    Thresholds,
)
from verify.generation import (
    forced_logits,
    generation_agreement,
    reference_continuations,
    streamed_top1,
)
from verify.judge import judge
from verify.peer import hf_peer, peer_outputs
from verify.prompts import Prompt, builtin_prompts, position_probes, text_prompt
from verify.readings import hf_reading_logits, other_reading, other_reading_applies
from verify.results import (
    Checksums,
    Environment,
    GenerationResult,
    Report,
)
from verify.runners import JaxRunner, TorchRunner

DTYPES = ("bfloat16", "float32")


class ChecksumFailure(Exception):
    """The converted folder does not match its manifest and cannot be loaded either: a parity
    failure (exit 1), not bad input."""

    def __init__(self, problems: list[str], cause: CheckpointError):
        super().__init__(f"{len(problems)} checksum problem(s); loading failed: {cause}")
        self.problems, self.cause = problems, cause


def share_the_gpu_with_torch() -> None:
    """JAX preallocates 75 % of a GPU when its backend starts, leaving torch too little for a
    reference model: make it allocate on demand instead, unless the user chose
    (XLA_PYTHON_CLIENT_PREALLOCATE / _MEM_FRACTION). Effective only before JAX's backend
    starts, so `verify` calls it on import."""
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def resolve_devices(device: str) -> tuple[str, jax.Device]:
    """(torch device, JAX device) for auto|cpu|gpu."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"] if device != "cpu" else []
    if device == "gpu" and not (gpus and torch.cuda.is_available()):
        raise ValueError("--device gpu: no GPU visible to both torch and JAX")
    if gpus and torch.cuda.is_available():
        return "cuda", gpus[0]
    return "cpu", jax.devices("cpu")[0]


def run_verification(
    reference: str | Path,
    converted: str | Path,
    *,
    dtype: str = "bfloat16",
    device: str = "auto",
    prompts: list[str | Prompt] | None = None,
    max_new_tokens: int = 32,
    stream_layers: bool = False,
    thresholds: Thresholds | None = None,
    peer: str | None = None,
    mesh: Mesh | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Report:
    """Compare the torch reference on `reference` with the JAX port on `converted`.

    `prompts`: texts (BOS prepended) or `verify.prompts.Prompt`s; default the built-in set.
    Without `stream_layers`, each model is loaded whole, one at a time: its own forward gives
    the free-running states and logits, and greedy generation is compared. With it, every
    model is held one block at a time and generation is skipped. Either way every block's
    pieces are then judged teacher-forced. `peer="hf"` adds HF transformers as a third
    implementation (informational). `mesh` (`model_jax.sharding.make_mesh`) shards the port.
    `on_step(message)` is told each phase and block as it starts (progress).
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    reference, converted = Path(reference), Path(converted)
    thresholds = thresholds or Thresholds()
    step = on_step or (lambda message: None)
    torch_device, jax_device = resolve_devices(device)
    # Streamed, a fine-grained MoE block's routed experts are read as they run, in both models.
    ref = TorchRunner(reference, torch_device, streamed=stream_layers)
    try:
        port = JaxRunner(converted, mesh, streamed=stream_layers)
    except CheckpointError as err:
        if checksum_problems := check_converted(converted):
            raise ChecksumFailure(checksum_problems, err) from None
        raise
    if ref.args != port.args:
        raise CheckpointError(
            converted / "params.json",
            f"describes a different model than {reference / 'params.json'} "
            f"({_differences(ref.args.to_dict(), port.args.to_dict())})",
        )
    tokenizer = Tokenizer.from_folder(reference)
    tokenizer.check_vocab(ref.args.vocab_size, reference / "params.json")
    prompts = [
        p if isinstance(p, Prompt) else text_prompt(p, tokenizer)
        for p in prompts or builtin_prompts(tokenizer)
    ]
    prompts += position_probes(ref.args, tokenizer)
    for prompt in prompts:
        if not prompt.tokens or max(prompt.tokens) >= ref.args.vocab_size:
            raise ValueError(
                f"prompt {prompt.text[:40]!r} is empty or has ids beyond the vocabulary"
            )
        new_tokens = 0 if prompt.start else max_new_tokens  # position probes generate none
        try:
            check_positions(ref.args, prompt.start + len(prompt.tokens), new_tokens)
        except ValueError as err:
            raise ValueError(f"prompt {prompt.text[:40]!r}: {err}") from None
    token_prompts = [list(p.tokens) for p in prompts]
    starts = [p.start for p in prompts]

    if peer not in (None, "hf"):
        raise ValueError(f"unknown peer {peer!r} (supported: hf)")
    # Both folders' SHA-256 on a thread of their own while the models run: hashlib and file
    # reads release the GIL, so hashing overlaps the models' work instead of preceding it.
    with concurrent.futures.ThreadPoolExecutor(1) as hashing, contextlib.ExitStack() as stack:
        step("checksums (in the background)")
        converted_check = hashing.submit(check_converted, converted)
        input_checksums = hashing.submit(_input_checksums, ref, converted)
        peer_states = peer_logits = hf = None
        if peer == "hf":
            step("peer: HF transformers")
            hf = stack.enter_context(hf_peer(reference, ref.args, torch_device))
            peer_states, peer_logits = peer_outputs(hf, token_prompts, starts)

        whole, generation = None, None
        n = ref.args.n_layers
        with jax.default_device(jax_device):
            if not stream_layers:
                whole, generation = _whole_models(
                    ref, port, token_prompts, starts, dtype, max_new_tokens, tokenizer, step
                )
            result = drift(
                ref,
                port,
                token_prompts,
                dtype,
                whole,
                peer_states,
                lambda i: step(f"teacher-forced: block {i + 1}/{n}"),
                starts,
            )
            moved = None
            if other_reading_applies(ref.args):
                step("the other reading of YaRN's softmax scale (HF's): reference fp32")
                moved = hf_reading_logits(ref, token_prompts, starts)
            if generation is not None:
                step("generation: the reference's own agreement")
                generated = [t for t, s in zip(token_prompts, starts, strict=True) if s == 0]
                generation = _generation_baseline(generation, ref, hf, generated, dtype)
        step("checksums: waiting for the hashes")
        checksum_problems = converted_check.result()
    factor, reduction = backend_factor(ref.args, torch_device, jax_device)
    report = judge(
        result,
        prompts,
        dtype,
        scaled_fp32(thresholds, factor),
        generation,
        checksum_problems,
        peer_logits,
        Checksums(
            ok=not checksum_problems,
            problems=tuple(checksum_problems),
            **input_checksums.result(),
        ),
        settings={
            "model_args": ref.args.to_dict(),
            "notes": (
                *model_notes(ref.args, ref.loader.roles, dtype),
                *backend_note(factor, reduction),
            ),
            "dtype": dtype,
            "stream_layers": stream_layers,
            "peer": peer,
            "mesh": "x".join(str(n) for n in mesh.shape.values()) if mesh else None,
            "environment": _environment(torch_device, jax_device),
            "seconds": time.perf_counter() - start,
        },
    )
    if moved is None:
        return report
    reading = other_reading(ref.args, moved, result.logits, dtype)
    return dataclasses.replace(
        report, logits=dataclasses.replace(report.logits, other_reading=reading)
    )


def model_notes(args: ModelArgs, roles: Roles, dtype: str) -> list[str]:
    """What the report must say about the model beyond its numbers: what is carried and not
    verified, which readings of the config were taken."""
    notes = []
    if args.has_vision:
        notes.append(
            f"vision encoder: carried, not verified ({len(roles.carried)} tensors beside the "
            "text decoder; the text decoder is verified)"
        )
    if args.yarn is not None:
        y = args.yarn
        magnitude = (
            f"softmax scale × {softmax_factor(args):.4g} (latent attention)"
            if args.latent
            else f"cos and sin × {y.attention_factor:.4g}"
        )
        notes.append(
            f"YaRN: factor {y.factor:g} over {y.original_max_position_embeddings} positions, "
            f"beta {y.beta:g} / alpha {y.alpha:g}; {magnitude} "
            f"(apply_scale {str(y.apply_scale).lower()})"
        )
    if args.llama_4_scaling is not None:
        scaling, yarn = args.llama_4_scaling, args.yarn
        note = (
            f"Llama-4 scaling: queries × (1 + {scaling.beta:g}·ln(1 + ⌊pos / "
            f"{scaling.original_max_position_embeddings}⌋)) (llama_4_scaling's length)"
        )
        if (
            yarn
            and yarn.original_max_position_embeddings != scaling.original_max_position_embeddings
        ):
            note += f"; HF would read yarn's {yarn.original_max_position_embeddings} instead"
        notes.append(note)
    if args.max_position_embeddings or args.max_seq_len:
        notes.append(
            f"max_position_embeddings {args.max_position_embeddings}, max_seq_len "
            f"{args.max_seq_len}: positions past max_position_embeddings are refused"
        )
    if args.tied_embeddings:
        notes.append("tied embeddings: the head is the embedding table")
    if roles.weight_scales:
        notes.append(
            f"FP8: {len(roles.weight_scales)} weights stored in FP8, dequantized (fp8 × scale in "
            f"fp32, then {dtype}) by both models; activations run in {dtype}, so "
            f"{len(roles.activation_scales)} static activation scales are unused"
        )
    if roles.unused:
        notes.append(f"{len(roles.unused)} fake-quantizer scales (FP8 KV cache) carried, unused")
    return notes


def _whole_models(ref, port, prompts, starts, dtype, max_new_tokens, tokenizer, step):
    """The states of both models in `dtype` from their own whole forward, one model at a
    time, and greedy generation (from the prompts that start at position 0) while each is
    loaded."""
    whole, continuations, generation = {}, [], []
    logits = []
    generated = [p for p, s in zip(prompts, starts, strict=True) if s == 0]

    def reference_generation(model):
        continuations.extend(reference_continuations(model, generated, max_new_tokens))
        logits.extend(forced_logits(ref, model, generated, continuations))

    def port_generation(model):
        generation.append(
            generation_agreement(model, generated, continuations, logits, max_new_tokens, tokenizer)
        )

    names = {"bfloat16": ("R16", "P16"), "float32": ("R32", "P32")}[dtype]
    for stream, runner, then in zip(
        names, (ref, port), (reference_generation, port_generation), strict=True
    ):
        step(f"whole model: {'reference' if runner is ref else 'port'} {dtype}")
        whole[stream] = whole_model_states(runner, dtype, prompts, starts, then)
        _release_gpu_memory()
    return whole, generation[0]


def _generation_baseline(generation, ref, peer, prompts, dtype) -> GenerationResult:
    """How often the reference's own other runs disagree with its continuation (bf16: its fp32
    run, held one group at a time, and the peer's bf16 run)."""
    if dtype != "bfloat16":
        return generation
    continuations = [list(p.reference_ids) for p in generation.prompts]
    total = generation.tokens

    def agreement(top1) -> float:
        matches = sum(
            int(np.sum(t == np.asarray(c))) for t, c in zip(top1, continuations, strict=True)
        )
        return matches / total

    fp32 = agreement(streamed_top1(ref, "float32", prompts, continuations))
    peer_top1 = None
    if peer is not None:
        model = peer.model("bfloat16")
        peer_top1 = agreement(
            [lg.argmax(-1) for lg in forced_logits(peer, model, prompts, continuations)]
        )
        del model
    return dataclasses.replace(generation, reference_fp32_top1=fp32, peer_top1=peer_top1)


def _release_gpu_memory() -> None:
    """Hand the memory of a phase's dropped model back before the next phase loads one:
    torch keeps freed blocks cached for itself; JAX frees an array when it is collected."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _differences(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def _input_checksums(ref: TorchRunner, converted: Path) -> dict:
    manifest = converted / "manifest.json"
    return {
        "reference_weights": tuple(
            {"file": p.name, "sha256": sha256_file(p)} for p in ref.loader.weight_files
        ),
        "reference_params_sha256": sha256_file(ref.loader.folder / "params.json"),
        "converted_manifest_sha256": sha256_file(manifest) if manifest.exists() else None,
    }


def _environment(torch_device: str, jax_device: jax.Device) -> Environment:
    versions = {name: _version(name) for name in ("jax", "jaxlib", "torch", "equinox", "numpy")}
    return Environment(
        versions=versions,
        python=platform.python_version(),
        platform=platform.platform(),
        torch_device=torch.cuda.get_device_name() if torch_device == "cuda" else "cpu",
        jax_device=str(getattr(jax_device, "device_kind", jax_device)),
        torch_peak_gpu_bytes=torch.cuda.max_memory_allocated() if torch_device == "cuda" else None,
        jax_peak_gpu_bytes=(
            (jax_device.memory_stats() or {}).get("peak_bytes_in_use")
            if jax_device.platform == "gpu"
            else None
        ),
    )


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
