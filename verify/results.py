"""What `run_verification` returns: frozen dataclasses, turned into JSON only when written."""

import dataclasses
import json
import math

from verify.metrics import LogitMetrics, StateMetrics

REPORT_FORMAT = "mistral-jax-port.report/1"


@dataclasses.dataclass(frozen=True)
class PieceResult:
    """One piece of one block, teacher-forced (see verify/drift.py)."""

    piece: str  # as the block declares it (`checkpoint.pieces`), or "block": the whole block
    bf16_ratio: float | None  # port bf16 error ÷ reference bf16 error, same input and truth
    bf16_limit: float | None  # its gate (wider when it rests on few tokens, verify/gates.py)
    fp32_error: float  # scale-aware error of the port in fp32
    nonfinite: int  # NaN/Inf values in the port's outputs
    prompt_bf16_ratios: tuple[float, ...]
    prompt_bf16_limits: tuple[float, ...]
    prompt_fp32_errors: tuple[float, ...]
    # Integer outputs (a router's chosen experts): fraction of tokens whose values differ from
    # the fp32 truth (port bf16, reference bf16) or from the reference (port fp32); None if the
    # piece has none. `…_unexplained`: those that are not near-ties (verify/metrics.py).
    integer_mismatch_bf16: float | None = None
    integer_mismatch_ref16: float | None = None
    integer_mismatch_fp32: float | None = None
    integer_tokens: int = 0
    integer_unexplained_bf16: int | None = None
    integer_unexplained_ref16: int | None = None
    integer_unexplained_fp32: int | None = None
    rerouted: int = 0  # whole block: tokens left out of its bf16 ratio (a router near-tie)
    # A piece both models compute in fp32 even in a bf16 run (a router): the reference's bf16
    # error is zero, so the port's bf16 error is judged as an fp32 error instead of a ratio.
    bf16_exact_error: float | None = None


@dataclasses.dataclass(frozen=True)
class LayerResult:
    name: str
    index: int | None  # block index; None for embeddings and final norm
    free: StateMetrics  # free-running, port vs reference in the verified dtype
    free_floor: float | None  # the reference's own bf16 error (scale-aware), free-running
    free_bf16_ratio: float | None  # port bf16 error ÷ that floor
    free_fp32_error: float  # the port against the reference, both fp32
    free_fp32_ratio: float | None  # the port's fp32 error vs float64 ÷ the reference's own
    free_nonfinite: int
    peer_bf16_ratio: float | None
    peer_fp32_error: float | None
    pieces: tuple[PieceResult, ...]
    failures: tuple[str, ...]
    free_rerouted: int = 0  # tokens left out of the free-running bf16 figures (re-routable)

    @property
    def block_bf16_ratio(self) -> float | None:
        return next((p.bf16_ratio for p in self.pieces if p.piece == "block"), None)


@dataclasses.dataclass(frozen=True)
class PeerLogits:
    metrics: LogitMetrics
    bf16_ratio: float
    fp32_error: float


@dataclasses.dataclass(frozen=True)
class OtherReading:
    """The reference's fp32 logits under HF transformers' reading of YaRN's softmax scale
    (latent attention, `apply_scale: false`), against its own: informational, not judged."""

    softmax_factor: float  # what HF's reading multiplies the softmax scale by (magnitude²)
    error: float  # RMS scaled error of the moved logits against the reference's fp32 ones
    noise: float  # the reference's own error in the verified dtype, the same measure
    noise_dtype: str
    ratio: float  # error ÷ noise
    top1_changed: int  # positions whose top-1 token changes
    positions: int


@dataclasses.dataclass(frozen=True)
class LogitResult:
    metrics: LogitMetrics  # port vs reference in the verified dtype
    floor: float | None
    bf16_ratio: float | None
    fp32_error: float
    fp32_ratio: float | None  # the port's fp32 error vs float64 ÷ the reference's own
    nonfinite: int
    peer: PeerLogits | None
    failures: tuple[str, ...]
    rerouted: int = 0  # tokens left out of the bf16 ratio: a router's near-tie (re-routable)
    other_reading: OtherReading | None = None  # latent attention, YaRN, apply_scale false


@dataclasses.dataclass(frozen=True)
class PromptResult:
    kind: str  # text, tokens or chat
    text: str
    tokens: int
    bos: bool
    verdict: str
    failures: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GenerationPrompt:
    reference_ids: tuple[int, ...]
    port_ids: tuple[int, ...]
    reference_text: str
    port_text: str
    exact_match: bool
    matched_prefix: int
    first_divergence: int | None
    teacher_forced_top1: float
    # At each token the port's top-1 differs from the reference's continuation: how much the
    # reference preferred its own token (logit gap).
    flip_gaps: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    max_new_tokens: int
    exact_match_prompts: int
    prompts: tuple[GenerationPrompt, ...]
    teacher_forced_top1: float  # the port's top-1 agreement along the reference's continuation
    tokens: int  # continuation tokens judged
    disagreements: int  # of them, where the port's top-1 differs
    # bf16: the reference's own fp32 run along its bf16 continuation, and the peer's bf16 run.
    reference_fp32_top1: float | None = None
    peer_top1: float | None = None
    # fp32: disagreements where the reference's gap is within its own fp32 noise (near-ties).
    near_ties: int = 0
    fp32_logit_noise: float | None = None  # max |reference fp32 − float64| logit, prompts
    allowed_disagreements: int | None = None  # beyond near-ties; more fails


@dataclasses.dataclass(frozen=True)
class Checksums:
    ok: bool
    problems: tuple[str, ...]
    reference_weights: tuple[dict, ...]  # {"file", "sha256"}
    reference_params_sha256: str
    converted_manifest_sha256: str | None


@dataclasses.dataclass(frozen=True)
class Environment:
    versions: dict
    python: str
    platform: str
    torch_device: str
    jax_device: str
    # Peak GPU memory each framework allocated during the run (None on CPU).
    torch_peak_gpu_bytes: int | None
    jax_peak_gpu_bytes: int | None


@dataclasses.dataclass(frozen=True)
class Report:
    verdict: str  # "pass" or "fail"
    reasons: tuple[str, ...]
    first_failing_layer: int | None  # the first block with a failing gate
    failing_blocks: tuple[int, ...]  # every block with a failing gate, pooled or on a prompt
    embeddings: LayerResult
    layers: tuple[LayerResult, ...]  # the blocks
    final_norm: LayerResult
    logits: LogitResult
    generation: GenerationResult | None
    checksums: Checksums
    thresholds: dict
    prompts: tuple[PromptResult, ...]
    model_args: dict
    notes: tuple[str, ...]  # what was carried, left unverified or decided (docs/formats.md)
    dtype: str
    stream_layers: bool
    peer: str | None
    mesh: str | None
    environment: Environment
    seconds: float

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_json(self) -> str:
        """JSON with non-finite numbers written as strings ("nan", "inf"), valid everywhere."""
        values = {"format": REPORT_FORMAT} | dataclasses.asdict(self)
        return json.dumps(_finite(values), indent=2) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
