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

from checkpoint.errors import CheckpointError
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


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _UnsafePickle(Exception):
    pass


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
        return _Storage(str(key), STORAGE_DTYPES[storage_type.name], int(numel))


def read_pth_table(path: str | Path) -> dict[str, TensorRecord]:
    """Tensor name → where its bytes lie in the zip; CheckpointError on anything unexpected."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_table(path, archive)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except (zipfile.BadZipFile, EOFError, struct.error) as err:
        raise CheckpointError(path, f"not a readable torch zip checkpoint ({err})") from None


def _read_table(path: Path, archive: zipfile.ZipFile) -> dict[str, TensorRecord]:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(path, f"expected one data.pkl in the zip, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CheckpointError(path, "big-endian checkpoints are not supported")
    try:
        table = _TableUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    except _UnsafePickle as err:
        raise CheckpointError(path, str(err)) from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(path, f"corrupt pickle in {pickles[0]} ({err})") from None
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
