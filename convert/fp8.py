"""FP8 weights of the mistral format (`quantization: {qformat_weight: fp8_e4m3}`) and of
compressed-tensors block FP8 (`quantization_config`, Large 3): checking their bytes and scales,
and dequantizing them, in numpy (a conversion never imports torch).

A quantized linear stores `X.weight` as float8_e4m3fn and `X.qscale_weight` (0-d, [1], or one
per output row), or `X.weight_scale` with one scale per block (128×128 rows × columns in the
release, the last blocks partial): the real weight is float32(fp8) × float32(its scale),
rounded once to the target dtype (HF's loader `Fp8Dequantize` and the torch reference do the
same).

e4m3fn has no infinities and two NaN encodings, 0x7F and 0xFF: a byte b is NaN exactly when
`b & 0x7F == 0x7F`. The check runs over blocks small enough to stay in cache (8 GB/s on this
CPU, against 0.8–1.3 GB/s for the SHA-256 every copied byte goes through anyway).

Decoding without a lookup table: the low 7 bits of an e4m3fn byte placed at bit 20 of a
float32 (sign at bit 31) are that float32's exponent and top mantissa bits, with the exponent
bias 127 instead of 7, so the float32 is the FP8 value × 2⁻¹²⁰ exactly (subnormal FP8 values
become subnormal float32s with the same digits); × 2¹²⁰ is then exact too (twice as fast as a
256-entry table). Where the thread treats subnormal float32s as zero (DAZ, set by some native
libraries), that would lose FP8's subnormals: the table is used instead.
"""

import dataclasses

import ml_dtypes
import numpy as np

from checkpoint.errors import CheckpointError
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord

BLOCK = 2**18  # elements per step: the temporaries (≤ 1 MiB) stay in cache
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_SIGN, _MAGNITUDE, _NAN = np.uint32(0x80), np.uint32(0x7F), np.uint8(0x7F)
_UNBIAS = np.float32(2.0**120)
# Every e4m3fn byte's float32 value (NaN bytes included; they are refused before decoding).
_TABLE = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_SMALLEST = np.array([0x00100000], np.uint32)  # FP8's smallest subnormal, 2⁻⁹, × 2⁻¹²⁰


def subnormals_work() -> bool:
    """Whether this thread's float32 arithmetic keeps subnormal inputs (no DAZ)."""
    return float(_SMALLEST.view(np.float32)[0] * _UNBIAS) == 2.0**-9


# The largest finite value of each target, for the overflow bound (a product can round up
# to infinity only past it).
_FINITE_MAX = {"BF16": 3.3895313892515355e38, "F16": 65504.0, "F32": 3.4028234663852886e38}


def first_nan(raw: np.ndarray) -> int | None:
    """Flat index of the first e4m3fn NaN byte (0x7F or 0xFF) in `raw` (uint8), else None."""
    flat = raw.reshape(-1)
    if flat.size == 0:
        return None
    scratch = np.empty(min(BLOCK, flat.size), np.uint8)
    for first in range(0, flat.size, BLOCK):
        block = flat[first : first + BLOCK]
        masked = scratch[: block.size]
        np.bitwise_and(block, _NAN, out=masked)
        if masked.max() == _NAN:
            return first + int(np.flatnonzero(masked == _NAN)[0])
    return None


def nan_error(record: TensorRecord, index: int) -> CheckpointError:
    """The one-line refusal of an FP8 weight holding a NaN byte at flat element `index`."""
    where = np.unravel_index(index, record.shape) if record.shape else ()
    return CheckpointError(
        record.path,
        f"tensor {record.name} holds NaN: its FP8 byte at [{', '.join(map(str, where))}] "
        "is 0x7F or 0xFF (e4m3fn NaN)",
    )


def nan_inspector(record: TensorRecord):
    """A `HashingWriter.copy_from` inspect callback refusing NaN bytes of `record` as they
    are copied (on the hashing thread, over the bytes it reads for the hash anyway)."""

    def inspect(chunk: memoryview, start: int) -> None:
        bad = first_nan(np.frombuffer(chunk, np.uint8))  # no array outlives the call
        if bad is not None:
            raise nan_error(record, start + bad)

    return inspect


def checked_scale(values: np.ndarray, record: TensorRecord, weight: str | None) -> np.ndarray:
    """A scale tensor as float32; CheckpointError naming it when a value is not finite."""
    values = np.asarray(values).astype(np.float32)
    if not np.isfinite(values).all():
        bad = values.reshape(-1)[~np.isfinite(values.reshape(-1))][0]
        role = f" (the scale of {weight})" if weight else ""
        raise CheckpointError(record.path, f"tensor {record.name}{role} is not finite ({bad})")
    return values


@dataclasses.dataclass(frozen=True)
class WeightScale:
    """A weight's scales as float32: per tensor (0-d or [1]), per row ([rows]), or per block
    ([row blocks, column blocks], each covering `block` rows × columns)."""

    values: np.ndarray
    block: tuple[int, int] | None = None

    def rows(self, first: int, n: int, shape: tuple[int, int]) -> np.ndarray:
        """The scales of rows first … first+n−1, shaped to broadcast over them: (n, 1) or
        (1, 1), or (n, columns) for blocks (only those rows expanded)."""
        if self.block is None:
            rows = shape[0] if self.values.size == shape[0] and self.values.ndim == 1 else 1
            by_row = self.values.reshape(rows, 1)
            return by_row[first : first + n] if rows > 1 else by_row
        (row_block, col_block), last = self.block, first + n - 1
        grid = self.values[first // row_block : last // row_block + 1]
        offset = first - (first // row_block) * row_block
        by_row = np.repeat(grid, row_block, axis=0)[offset : offset + n]
        return np.repeat(by_row, col_block, axis=1)[:, : shape[1]]


def dequantize_into(
    raw: np.ndarray, scale: np.ndarray, out: np.ndarray, record: TensorRecord
) -> None:
    """`out[...] = float32(fp8) × float32(scale)` cast to `out`'s dtype, for `raw` the FP8
    bytes (uint8, rows × cols, checked for NaN by the caller) of `record` and `scale` those
    rows' scales (`WeightScale.rows`). CheckpointError naming the tensor on a product the
    target cannot hold."""
    rows, cols = raw.shape
    target = next(k for k, v in NUMPY_DTYPES.items() if v == out.dtype)
    may_overflow = FP8_MAX * float(np.abs(scale).max(initial=0.0)) >= _FINITE_MAX[target]
    step = max(1, BLOCK // max(cols, 1))
    bits = np.empty((min(step, rows), cols), np.uint32)
    sign = np.empty_like(bits)
    by_bits = subnormals_work()
    for first in range(0, rows, step):
        block = raw[first : first + step]
        n = block.shape[0]
        b, s = bits[:n], sign[:n]
        values = b.view(np.float32)
        if by_bits:
            np.copyto(b, block, casting="unsafe")
            np.bitwise_and(b, _SIGN, out=s)
            np.left_shift(s, 24, out=s)
            np.bitwise_and(b, _MAGNITUDE, out=b)
            np.left_shift(b, 20, out=b)
            np.bitwise_or(b, s, out=b)
            np.multiply(values, _UNBIAS, out=values)  # exact: now float32(fp8)
        else:
            np.take(_TABLE, block, out=values)
        with np.errstate(over="ignore"):  # an overflow is refused below, by name
            np.multiply(
                values, scale[first : first + n] if scale.shape[0] > 1 else scale, out=values
            )
            np.copyto(out[first : first + n], values, casting="unsafe")
        if may_overflow and not np.isfinite(out[first : first + n]).all():
            raise CheckpointError(
                record.path, f"tensor {record.name} × its scale overflows {target}"
            )


def dequantize(raw: np.ndarray, scale: WeightScale, record: TensorRecord) -> np.ndarray:
    """The float32 real weight of FP8 bytes `raw` (rows × cols) and their scale;
    CheckpointError naming the tensor on a NaN byte."""
    bad = first_nan(raw)
    if bad is not None:
        raise nan_error(record, bad)
    out = np.empty(raw.shape, np.float32)
    dequantize_into(raw, scale.rows(0, raw.shape[0], raw.shape), out, record)
    return out
