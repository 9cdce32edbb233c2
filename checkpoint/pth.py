"""Read the tensor table of a torch zip checkpoint (`consolidated.00.pth`) without running it.

A `.pth` is a zip holding `<name>/data.pkl` and one raw entry per storage, `<name>/data/<key>`.
The pickle is replayed by an unpickler that resolves only the globals `torch.save` emits for a
dict of tensors (`torch._utils._rebuild_tensor_v2`, `torch.*Storage`, `collections.OrderedDict`)
to inert stand-ins, so no code from the file ever runs and no tensor data is read.
Storage layout facts from torch `serialization.py` (`_save`, `_load`).
"""

import collections
import dataclasses
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path

from checkpoint.errors import CheckpointError, reading
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord

STORAGE_DTYPES = {
    "BFloat16Storage": "BF16",
    "HalfStorage": "F16",
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
}


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str


MAX_PICKLE_BYTES = 64 * 2**20  # a 7B's data.pkl is tens of kB; Mixtral 8x22B's ~200 kB


class _UnsafePickle(Exception):
    pass


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _UnsafePickle(f"{what} is not a non-negative integer: {value!r:.60}")
    return value


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or len(values) > 16:
        raise _UnsafePickle(f"{what} is not a short sequence of integers: {values!r:.60}")
    return tuple(_int(v, what) for v in values)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise _UnsafePickle(f"tensor storage is not a storage: {storage!r:.60}")
    return _TensorRef(
        storage,
        _int(storage_offset, "tensor offset"),
        _ints(size, "tensor shape"),
        _ints(stride, "tensor stride"),
    )


class _TableUnpickler(pickle.Unpickler):
    """Resolves only the handful of globals a saved tensor dict needs; refuses the rest."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise _UnsafePickle(f"unsupported tensor dtype torch.{name}")
        raise _UnsafePickle(
            f"refusing to load global {module}.{name} (not a plain tensor checkpoint)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _UnsafePickle(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _UnsafePickle(f"unsupported storage type {storage_type!r:.80}")
        if not isinstance(key, str):
            raise _UnsafePickle(f"storage key is not a string: {key!r:.60}")
        return _Storage(key, STORAGE_DTYPES[storage_type.name], _int(numel, "storage size"))


def read_pth_table(path: str | Path) -> dict[str, TensorRecord]:
    """Tensor name → where its bytes lie in the zip; CheckpointError on anything unexpected."""
    path = Path(path)
    with reading(path):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise CheckpointError(path, f"not a readable torch zip checkpoint ({err})") from None
        with archive:
            return _read_table(path, archive)


def check_pickle_size(path: str | Path) -> None:
    """Refuse a zip whose data.pkl would inflate past MAX_PICKLE_BYTES (a memory bomb), before
    anything — ours or torch.load — reads it."""
    path = Path(path)
    with reading(path), zipfile.ZipFile(path) as archive:
        _pickle_entry(path, archive)


def _pickle_entry(path: Path, archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    pickles = [i for i in archive.infolist() if i.filename.split("/")[-1] == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(path, f"expected one data.pkl in the zip, found {len(pickles)}")
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(
            path,
            f"{pickles[0].filename} declares {pickles[0].file_size} bytes, more than the "
            f"{MAX_PICKLE_BYTES} a tensor table needs",
        )
    return pickles[0]


def _read_table(path: Path, archive: zipfile.ZipFile) -> dict[str, TensorRecord]:
    entry = _pickle_entry(path, archive)
    prefix = entry.filename[: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CheckpointError(path, "big-endian checkpoints are not supported")
    with archive.open(entry) as stream:  # read at most the limit, whatever the header says
        raw = stream.read(MAX_PICKLE_BYTES + 1)
    if len(raw) > MAX_PICKLE_BYTES:
        raise CheckpointError(path, f"{entry.filename} inflates past {MAX_PICKLE_BYTES} bytes")
    try:
        table = _TableUnpickler(io.BytesIO(raw)).load()
    except _UnsafePickle as err:
        raise CheckpointError(path, str(err)) from None
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, _TensorRef) for k, v in table.items()
    ):
        raise CheckpointError(path, "data.pkl does not hold a flat dict of name → tensor")

    file_size = path.stat().st_size
    records = {}
    for name, ref in table.items():
        info = _storage_entry(path, archive, prefix, ref.storage)
        data_start = _entry_data_offset(path, archive, info)
        if data_start + info.file_size > file_size:
            raise CheckpointError(path, f"storage of {name} runs past the end of the file")
        contiguous = _contiguous_strides(ref.shape)
        if math.prod(ref.shape) > 1 and ref.stride != contiguous:
            raise CheckpointError(
                path, f"tensor {name} is not contiguous (stride {ref.stride}); unsupported"
            )
        itemsize = NUMPY_DTYPES[ref.storage.dtype].itemsize
        if ref.offset < 0 or ref.offset + math.prod(ref.shape) > ref.storage.numel:
            raise CheckpointError(path, f"tensor {name} lies outside its storage")
        records[name] = TensorRecord(
            name, path, ref.storage.dtype, ref.shape, data_start + ref.offset * itemsize
        )
    return records


def _storage_entry(
    path: Path, archive: zipfile.ZipFile, prefix: str, storage: _Storage
) -> zipfile.ZipInfo:
    entry = f"{prefix}data/{storage.key}"
    try:
        info = archive.getinfo(entry)
    except KeyError:
        raise CheckpointError(path, f"zip entry {entry} is missing") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(path, f"zip entry {entry} is compressed; expected stored bytes")
    expected = storage.numel * NUMPY_DTYPES[storage.dtype].itemsize
    if info.file_size != expected:
        raise CheckpointError(
            path, f"zip entry {entry} holds {info.file_size} bytes, its storage needs {expected}"
        )
    return info


def _entry_data_offset(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Absolute file offset of a stored entry's bytes (after its local file header)."""
    archive.fp.seek(info.header_offset)
    header = archive.fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(path, f"bad local header for zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
