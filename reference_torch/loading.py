"""Load weights into the reference on the meta device, then assign — mistral-inference
`Transformer.from_folder`.

Only torch's own readers are used (`torch.load(weights_only=True, mmap=True)`, `safetensors`),
never the JAX side's `checkpoint` readers, so a reader bug shows up as a parity failure instead
of being shared by both models. `ReferenceLoader` reads the whole model, or only the embeddings,
final norm and head (`shell`, optionally only some rows of the vocabulary table), or one block
(`block`); each read maps the file, copies what it needs and drops the mapping, so streaming a
7B keeps one block (or shell) resident, and its tensors in their stored dtype, for its next
dtype.
"""

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from checkpoint.args import ModelArgs
from checkpoint.dtypes import torch_dtype
from checkpoint.errors import CheckpointError, describe, reading
from checkpoint.folder import open_folder, raise_spec_problems, read_weight_map, weights_entry
from checkpoint.pth import check_pickle_size
from checkpoint.spec import FP8, layer_spec, shell_modules, tensor_spec, vocab_table
from checkpoint.tensors import TensorRecord, layer_records, prefetch
from reference_torch.cast_buffer import CastBuffer
from reference_torch.model import FeedForward, Transformer, TransformerBlock, make_block

CHECK_ELEMENTS = 1 << 25  # a table read by rows is checked for NaN/Inf this many at a time
# An IEEE float is NaN or Inf exactly when its exponent bits are all ones.
_EXPONENT_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


class _Tensors:
    """name → tensor over one folder's weight files, read with torch's own readers."""

    def __init__(self, folder: Path):
        self.source = weights_entry(folder)
        if self.source.name.endswith(".index.json"):  # split official weights, or converted
            weight_map = read_weight_map(self.source)
            self.files = {name: folder / shard for name, shard in weight_map.items()}
        else:
            with self._open(self.source) as state:
                self.files = dict.fromkeys(state, self.source)

    def _open(self, path: Path) -> contextlib.AbstractContextManager:
        if path.suffix == ".safetensors":
            return _safetensors_state(path)
        return _pth_state(path)

    @contextlib.contextmanager
    def read(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """The named tensors, still backed by the file while the block runs."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        with contextlib.ExitStack() as stack:
            tensors = {}
            for path, wanted in by_file.items():
                state = stack.enter_context(self._open(path))
                tensors |= {name: state[name] for name in wanted}
            yield tensors

    def rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows `rows` (ascending) of tensor `name`, copied out of its file: only they are
        read."""
        with self._open(self.files[name]) as state:
            if isinstance(state, _SafetensorsState):
                return state.rows(name, rows)
            return state[name][torch.tensor(rows)]  # the mapping's pages of these rows only

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name → (shape, safetensors dtype name)."""
        with self.read(list(self.files)) as tensors:
            return {name: (tuple(t.shape), _dtype_name(t.dtype)) for name, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    return names.get(dtype) or {torch.float64: "F64", torch.float8_e4m3fn: FP8}.get(
        dtype, str(dtype)
    )


@contextlib.contextmanager
def _pth_state(path: Path) -> Iterator[dict[str, torch.Tensor]]:
    check_pickle_size(path)  # torch.load would inflate a data.pkl bomb in memory
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for unsafe or corrupt pickles
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(path, f"cannot load safely ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "does not hold a dict of tensors")
    yield state


class _SafetensorsState(Mapping):
    """name → tensor of an open safetensors file, each read when asked for."""

    def __init__(self, handle):
        self._handle, self._names = handle, list(handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows `rows` (ascending) of tensor `name`, each run of consecutive rows one read."""
        tensor, runs, first = self._handle.get_slice(name), [], 0
        for k in range(1, len(rows) + 1):
            if k == len(rows) or rows[k] != rows[k - 1] + 1:
                runs.append(tensor[rows[first] : rows[k - 1] + 1])
                first = k
        return torch.cat(runs)

    def __len__(self) -> int:
        return len(self._names)


@contextlib.contextmanager
def _safetensors_state(path: Path) -> Iterator[Mapping[str, torch.Tensor]]:
    """The file's tensors; the safetensors library's own errors (opening it, or a tensor it
    lacks) become CheckpointErrors naming it."""
    with reading(path):
        try:
            with safe_open(path, framework="pt") as handle:
                yield _SafetensorsState(handle)
        except SafetensorError as err:
            raise CheckpointError(path, f"not a valid safetensors file ({describe(err)})") from None


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a CPU tensor: the largest exponent field, read from the raw bits (a
    masked integer max: an order of magnitude cheaper than `torch.isfinite` on bf16)."""
    if tensor.dtype not in _EXPONENT_BITS or tensor.numel() == 0:
        return bool(torch.isfinite(tensor).all())
    bits, mask = _EXPONENT_BITS[tensor.dtype]
    exponents = np.bitwise_and(tensor.contiguous().view(bits).numpy(), mask)
    return int(exponents.max()) < mask


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """An FP8 weight's real values: fp8 × scale, the product in float32 (HF's loader does the
    same; the JAX model too, inside its matmul). A per-row scale scales its row; with `block`
    (rows × columns), scale[i, j] scales the weight's block (i, j), the last ones partial."""
    if block is None:
        return weight.float() * scale.float().reshape(-1, 1)
    rows, cols = weight.shape
    if rows % block[0] == 0 and cols % block[1] == 0:  # whole blocks: scale each in place
        blocks = weight.float().view(rows // block[0], block[0], cols // block[1], block[1])
        return (blocks * scale.float()[:, None, :, None]).view(rows, cols)
    expanded = scale.float().repeat_interleave(block[0], 0)[:rows]
    return weight.float() * expanded.repeat_interleave(block[1], 1)[:, :cols]


class ReferenceLoader:
    """The weights of an official (or converted) folder, for the reference, in pieces."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.args = ModelArgs.from_json(self.folder / "params.json")
        self._tensors = _Tensors(self.folder)
        self._shapes = self._tensors.shapes()
        self.roles = raise_spec_problems(self._tensors.source, self._shapes, self.args)
        # weight name → its scale: FP8 weights are dequantized as they are read
        self._scales = {w: s for s, w in self.roles.weight_scales.items()}
        self._finite: set[str] = set()  # tensors already found finite (each read is checked)
        self._kept: tuple[tuple[str, ...], dict[str, torch.Tensor]] | None = None
        self._casts = CastBuffer()
        self._ranges: dict[str, TensorRecord] | None = None  # where each tensor lies: hints

    @property
    def weight_files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(self._tensors.files.values()))

    def _assign(
        self,
        module: torch.nn.Module,
        names: dict[str, str],
        dtype,
        device,
        *,
        strict: bool = True,
        keep: bool = False,
    ) -> None:
        """Copy the checkpoint tensors `names` (module key → checkpoint key) into `module`.
        `keep`: the tensors stay in memory in their stored dtype until other names are kept,
        so a block asked for in bf16, fp32 and float64 in turn is read from its file once."""
        dtype = torch_dtype(dtype)
        if keep:
            stored = self._kept_tensors(tuple(names.values()))
            on_host = torch.device(device).type == "cpu"
            chosen = {key: stored[name] for key, name in names.items()}
            cast = self._casts.cast(chosen, dtype) if on_host else None
            state = cast or {key: t.to(device=device, dtype=dtype) for key, t in chosen.items()}
        else:
            cast = None
            with self._stored(tuple(names.values())) as stored:
                state = {
                    key: stored[name].to(device=device, dtype=dtype, copy=True)
                    for key, name in names.items()
                }
        module.load_state_dict(state, strict=strict, assign=True)
        if cast is not None:
            self._casts.built(module)

    @contextlib.contextmanager
    def _stored(self, names: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        """The named tensors in their stored dtype (FP8 weights dequantized), still backed by
        the file; CheckpointError naming the first that holds NaN or Inf (each checked on its
        first read only)."""
        scales = [self._scales[n] for n in names if n in self._scales]
        with self._tensors.read([*names, *scales]) as tensors:
            out = {}
            for name in names:
                tensor = tensors[name]
                if name in self._scales:
                    scale = tensors[self._scales[name]]
                    tensor = dequantize(tensor, scale, self.args.fp8_block)
                if name not in self._finite:
                    if not all_finite(tensor):
                        path = self._tensors.files[name]
                        raise CheckpointError(path, f"tensor {name} is not finite")
                    self._finite.add(name)
                out[name] = tensor
            yield out

    def _kept_tensors(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """`_stored(names)` copied into memory, kept until other names are asked for."""
        if self._kept is None or self._kept[0] != names:
            self._kept = None  # the previous block's tensors freed before these are read
            with self._stored(names) as stored:
                self._kept = (names, {name: t.clone() for name, t in stored.items()})
        return self._kept[1]

    def model(self, *, dtype="bfloat16", device: str | torch.device = "cpu") -> Transformer:
        """The whole model, strict on keys and shapes."""
        with torch.device("meta"):
            model = Transformer(self.args)
        names = {name: name for name in tensor_spec(self.args)}
        self._assign(model, names, dtype, device)
        return model.eval().requires_grad_(False)

    def shell(
        self,
        part: str,
        *,
        dtype="bfloat16",
        device: str | torch.device = "cpu",
        rows: list[int] | None = None,
    ) -> Transformer:
        """What `part` needs loaded ("embed": the embeddings; "head": the final norm and the
        head, `checkpoint.spec.shell_modules`); everything else stays on the meta device.
        `rows` (ascending): only these rows of its vocabulary table (`vocab_table`) are read,
        and the shell's table holds them in that order. The rest is kept in memory for the
        next dtype, as a block's tensors are (`_assign`)."""
        with torch.device("meta"):
            model = Transformer(self.args)
        shell = {f"{m}.weight": f"{m}.weight" for m in shell_modules(self.args, part)}
        if rows is not None:
            table = vocab_table(self.args, part)
            weight = self._rows(shell.pop(f"{table}.weight"), rows)
            getattr(model, table).weight = torch.nn.Parameter(
                weight.to(device=device, dtype=torch_dtype(dtype)), requires_grad=False
            )
        self._assign(model, shell, dtype, device, strict=False, keep=True)  # for the next dtype
        return model.eval().requires_grad_(False)

    def _rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows `rows` of tensor `name` in its stored dtype; CheckpointError if they hold NaN
        or Inf."""
        if name in self._scales:
            raise ValueError(f"{name}: the rows of an FP8 table are not read alone")
        self._check_rows_finite(name)
        return self._tensors.rows(name, rows)

    def _check_rows_finite(self, name: str) -> None:
        """A tensor read by rows is still checked whole on its first read (a NaN in a row no
        prompt reads is bad input all the same), `CHECK_ELEMENTS` at a time."""
        if name in self._finite:
            return
        (count, *row_shape), _ = self._shapes[name]
        step = max(1, CHECK_ELEMENTS // math.prod(row_shape))
        for first in range(0, count, step):
            part = self._tensors.rows(name, list(range(first, min(first + step, count))))
            if not all_finite(part):
                raise CheckpointError(self._tensors.files[name], f"tensor {name} is not finite")
        self._finite.add(name)

    def block(
        self,
        i: int,
        *,
        dtype="bfloat16",
        device: str | torch.device = "cpu",
        stream_experts: bool = False,
    ) -> TransformerBlock:
        """Block `i` alone (its tensors kept in memory for the next dtype: `_assign`). With
        `stream_experts`, a fine-grained MoE block's routed experts are `StreamedExpert`s:
        each reads its weights when it runs and drops them after."""
        with torch.device("meta"):
            block = make_block(self.args, i)
        prefix = f"layers.{i}."
        names = {name: prefix + name for name in layer_spec(self.args, i)}
        if stream_experts and block.moe is not None:
            for e in range(len(block.experts)):  # in place: the block's MoE runs this list
                block.experts[e] = StreamedExpert(self, f"{prefix}experts.{e}.", dtype, device)
            names = {k: v for k, v in names.items() if not k.startswith("experts.")}
        if self._kept is None or self._kept[0] != tuple(names.values()):  # to be read
            self._prefetch(
                [i, i + 1], routed_experts=not (stream_experts and block.moe is not None)
            )
        self._assign(block, names, dtype, device, keep=True)
        return block.eval().requires_grad_(False)

    def _prefetch(self, layers: list[int], routed_experts: bool) -> None:
        """These layers' bytes asked of the disk now (`checkpoint.tensors.prefetch`): the
        block about to be read and the next, read in the background while this one runs.
        The byte ranges come from the `checkpoint` table, a hint only: every value is still
        read with torch's readers (a table it cannot give leaves the hints out)."""
        if self._ranges is None:
            try:
                self._ranges = open_folder(self.folder).tensors
            except CheckpointError:
                self._ranges = {}
        prefetch(layer_records(self._ranges, layers, routed_experts))

    def expert(self, prefix: str, *, dtype, device) -> FeedForward:
        """The routed expert whose tensors are named `prefix`w1.weight, … (read now)."""
        with torch.device("meta"):
            expert = FeedForward(self.args, self.args.moe.expert_hidden_dim)
        names = {f"{w}.weight": f"{prefix}{w}.weight" for w in ("w1", "w2", "w3")}
        self._assign(expert, names, dtype, device)
        return expert.eval().requires_grad_(False)


class StreamedExpert(torch.nn.Module):
    """A routed expert that reads its weights from the checkpoint each time it runs on some
    token, and drops them after: one Mistral Large 3 layer's routed experts are ≈ 11 GB in
    FP8, 90 GB in float64. The MoE's own loop runs it as it runs a held expert."""

    def __init__(self, loader: ReferenceLoader, prefix: str, dtype, device):
        super().__init__()
        self.loader, self.prefix, self.dtype, self.device = loader, prefix, dtype, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # chosen by no token: an expert maps dim to dim
            return x.new_zeros(x.shape)
        return self.loader.expert(self.prefix, dtype=self.dtype, device=self.device)(x)
