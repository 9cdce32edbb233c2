"""`run_verification`: checksums, per-layer drift, logits and generation, judged by gates."""

import dataclasses
import hashlib
import importlib.metadata
import platform
import time
from pathlib import Path

import jax
import torch

from checkpoint.folder import official_weights_file, open_folder
from checkpoint.tokenizer import Tokenizer
from convert.check import check_converted
from model_jax.sharding import make_mesh
from verify.drift import layer_drift
from verify.gates import Thresholds
from verify.generation import generation_agreement, load_for_generation
from verify.metrics import logit_metrics, relative_l2
from verify.peer import hf_peer_outputs
from verify.prompts import BUILTIN_PROMPTS
from verify.runners import JaxLayers, TorchLayers


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
    prompts: list[str] | None = None,
    max_new_tokens: int = 32,
    stream_layers: bool = False,
    thresholds: Thresholds | None = None,
    peer: str | None = None,
    mesh: str | None = None,
) -> dict:
    """Compare the torch reference on `reference` with the JAX port on `converted`.

    Returns the whole report as a dict: `verdict`, `reasons`, `first_failing_layer`, `layers`,
    `logits`, `generation`, `checksums`, `environment`. With `stream_layers` only one block of
    each model is resident at a time and generation agreement (which needs whole models) is
    skipped. `peer="hf"` adds HF transformers as a third implementation (informational
    columns, not gated). `mesh` ("DATAxMODEL", e.g. "1x8") shards the port's weights.
    """
    start = time.perf_counter()
    reference, converted = Path(reference), Path(converted)
    thresholds = thresholds or Thresholds()
    torch_device, jax_device = resolve_devices(device)
    jax_mesh = make_mesh(mesh) if mesh else None
    args = open_folder(reference).args
    tokenizer = Tokenizer(reference / "tokenizer.model")
    texts = prompts or BUILTIN_PROMPTS
    token_prompts = [tokenizer.encode(t) for t in texts]

    checksum_problems = check_converted(converted)
    peer_states = peer_logits = None
    if peer == "hf":
        peer_states, peer_logits = hf_peer_outputs(reference, token_prompts, torch_device)
    elif peer is not None:
        raise ValueError(f"unknown peer {peer!r} (supported: hf)")
    with jax.default_device(jax_device):
        layers, logits = layer_drift(
            TorchLayers(reference, torch_device, stream=stream_layers),
            JaxLayers(converted, jax_device, jax_mesh),
            token_prompts,
            dtype,
            peer_states,
        )
    port_key, ref_key = ("P16", "R16") if dtype == "bfloat16" else ("P32", "R32")
    logit_report = logit_metrics(logits[port_key], logits[ref_key]) | {
        "noise_floor_rel_l2": relative_l2(logits["R16"], logits["R32"]),
        "bf16_error_over_floor": relative_l2(logits["P16"], logits["R32"])
        / relative_l2(logits["R16"], logits["R32"]),
        "fp32_rel_l2": relative_l2(logits["P32"], logits["R32"]),
    }
    if peer_logits is not None:
        logit_report["peer"] = logit_metrics(peer_logits[dtype], logits[ref_key]) | {
            "bf16_error_over_floor": relative_l2(peer_logits["bfloat16"], logits["R32"])
            / relative_l2(logits["R16"], logits["R32"]),
            "fp32_rel_l2": relative_l2(peer_logits["float32"], logits["R32"]),
        }
    generation = None
    if not stream_layers:
        ref_model, port_model = load_for_generation(
            reference, converted, dtype, torch_device, jax_device, jax_mesh
        )
        with jax.default_device(jax_device):
            generation = generation_agreement(ref_model, port_model, token_prompts, max_new_tokens)
        for entry in generation["prompts"]:
            entry["reference_text"] = tokenizer.decode(entry["reference_ids"])
            entry["port_text"] = tokenizer.decode(entry["port_ids"])
        del ref_model, port_model

    reasons, first_failing = judge(
        layers, logit_report, generation, checksum_problems, dtype, thresholds
    )
    return {
        "verdict": "fail" if reasons else "pass",
        "reasons": reasons,
        "first_failing_layer": first_failing,
        "layers": [e for e in layers if e["index"] is not None],
        "embeddings": layers[0],
        "final_norm": layers[-1],
        "logits": logit_report,
        "generation": generation,
        "checksums": {
            "ok": not checksum_problems,
            "problems": checksum_problems,
            "inputs": _input_checksums(reference, converted),
        },
        "thresholds": dataclasses.asdict(thresholds),
        "prompts": [
            {"text": t, "tokens": len(p)} for t, p in zip(texts, token_prompts, strict=True)
        ],
        "model_args": args.to_dict(),
        "dtype": dtype,
        "stream_layers": stream_layers,
        "peer": peer,
        "mesh": mesh,
        "environment": _environment(torch_device, jax_device),
        "seconds": time.perf_counter() - start,
    }


def judge(layers, logits, generation, checksum_problems, dtype, t: Thresholds):
    """Reasons for failure (empty: pass) and the first block whose teacher-forced gate fails."""
    reasons = [f"checksum: {p}" for p in checksum_problems]
    first_failing = None
    for entry in layers:
        if entry["index"] is None:
            continue
        bad = []
        if entry["teacher_forced_fp32_rel_l2"] > t.teacher_forced_fp32_rel_l2:
            bad.append(
                f"teacher-forced fp32 relative L2 {entry['teacher_forced_fp32_rel_l2']:.2e}"
                f" > {t.teacher_forced_fp32_rel_l2:g}"
            )
        if dtype == "bfloat16" and (
            entry["teacher_forced_bf16_over_floor"] > t.teacher_forced_bf16_over_floor
        ):
            bad.append(
                f"teacher-forced bf16 error {entry['teacher_forced_bf16_over_floor']:.2f}×"
                f" the noise floor > {t.teacher_forced_bf16_over_floor:g}×"
            )
        entry["passed"] = not bad
        if bad:
            reasons.append(f"{entry['name']}: {'; '.join(bad)}")
            if first_failing is None:
                first_failing = entry["index"]
    if logits["fp32_rel_l2"] > t.logits_fp32_rel_l2:
        reasons.append(
            f"logits: fp32 relative L2 {logits['fp32_rel_l2']:.2e} > {t.logits_fp32_rel_l2:g}"
        )
    if dtype == "bfloat16":
        for name, value in [
            ("final norm", layers[-1]["bf16_error_over_floor"]),
            ("logits", logits["bf16_error_over_floor"]),
        ]:
            if value > t.free_bf16_over_floor:
                reasons.append(
                    f"{name}: free-running bf16 error {value:.2f}× the noise floor "
                    f"> {t.free_bf16_over_floor:g}×"
                )
    if generation is not None:
        need = (
            t.generation_teacher_forced_top1_bf16
            if dtype == "bfloat16"
            else t.generation_teacher_forced_top1_fp32
        )
        if generation["teacher_forced_top1"] < need:
            reasons.append(
                f"generation: teacher-forced top-1 agreement "
                f"{generation['teacher_forced_top1']:.3f} < {need:g}"
            )
    return reasons, first_failing


def _input_checksums(reference: Path, converted: Path) -> dict:
    def sha(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(16 * 2**20):
                digest.update(chunk)
        return digest.hexdigest()

    weights = official_weights_file(reference)
    return {
        "reference_weights": {"file": weights.name, "sha256": sha(weights)},
        "reference_params_sha256": sha(reference / "params.json"),
        "converted_manifest_sha256": (
            sha(converted / "manifest.json") if (converted / "manifest.json").exists() else None
        ),
    }


def _environment(torch_device: str, jax_device: jax.Device) -> dict:
    versions = {name: _version(name) for name in ("jax", "jaxlib", "torch", "equinox", "numpy")}
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_device": (torch.cuda.get_device_name() if torch_device == "cuda" else "cpu"),
        "jax_device": str(getattr(jax_device, "device_kind", jax_device)),
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
