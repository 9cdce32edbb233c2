"""Fuzzing the readers: seeded mutations of valid .pth, safetensors, params.json, config.json,
index and manifest files (truncations, byte flips, type swaps, deep nesting, hand-crafted
pickles). Whatever the mutation, only CheckpointError escapes, and no output is left behind."""

import copy
import io
import json
import pickle
import random
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from support import tiny_args

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError
from checkpoint.folder import open_folder
from checkpoint.safetensors_file import read_safetensors_table
from checkpoint.tiny import write_tiny_checkpoint
from convert.check import check_converted
from convert.convert import convert_checkpoint
from convert.sources import open_source
from reference_torch.loading import ReferenceLoader

ARGS = tiny_args(vocab_size=32000, n_layers=1)
CASES_PER_KIND = 40
DEEP = "__nested 100 000 deep__"  # dumped as a placeholder, then spliced in as text
SWAPS = [[], {}, "x", -1, 0, 2**70, 1e308, None, True, [[1, 2], [3]], {"a": [1]}, DEEP]


def deep(levels: int = 100_000) -> str:
    return "[" * levels + "]" * levels


def dumps(value) -> bytes:
    """JSON of `value`, with every DEEP placeholder replaced by a 100 000-deep array."""
    return json.dumps(value).replace(json.dumps(DEEP), deep()).encode()


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def flip(data: bytes, rng: random.Random, region: tuple[int, int] | None = None) -> bytes:
    start, end = region or (0, len(data))
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        mutated[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    return bytes(mutated)


def swap_json(value, rng: random.Random):
    """A copy of a JSON value with one member, anywhere in it, replaced by another type."""
    value = copy.deepcopy(value)
    paths = list(_paths(value))
    if not paths:
        return rng.choice(SWAPS)
    *parents, last = rng.choice(paths)
    target = value
    for key in parents:
        target = target[key]
    target[last] = rng.choice(SWAPS)
    return value


def _paths(value, prefix=()):
    if not isinstance(value, dict | list):
        return
    for key, child in value.items() if isinstance(value, dict) else enumerate(value):
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def json_mutations(data: bytes, seed: int) -> list[bytes]:
    rng, parsed = random.Random(seed), json.loads(data)
    out = [deep().encode(), b'{"dim": ' + deep().encode() + b"}", b"", b"[1, 2]", b"null"]
    while len(out) < CASES_PER_KIND:
        kind = rng.choice(["truncate", "flip", "swap", "swap", "drop"])
        if kind == "truncate":
            out.append(truncate(data, rng))
        elif kind == "flip":
            out.append(flip(data, rng))
        elif kind == "drop" and isinstance(parsed, dict) and parsed:
            dropped = dict(parsed)
            dropped.pop(rng.choice(list(dropped)))
            out.append(dumps(dropped))
        else:
            out.append(dumps(swap_json(parsed, rng)))
    return out


def safetensors_mutations(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])

    def rebuild(new_header) -> bytes:
        raw = dumps(new_header)
        return struct.pack("<Q", len(raw)) + raw + data[8 + length :]

    out = [rebuild(DEEP), struct.pack("<Q", 2**63) + data[8:]]
    while len(out) < CASES_PER_KIND:
        kind = rng.choice(["truncate", "flip-header", "flip", "swap", "swap"])
        if kind == "truncate":
            out.append(truncate(data, rng))
        elif kind == "flip-header":
            out.append(flip(data, rng, (0, 8 + length)))
        elif kind == "flip":
            out.append(flip(data, rng))
        else:
            out.append(rebuild(swap_json(header, rng)))
    return out


class _Storage:
    def __init__(self, key, numel, pid=None):
        self.key, self.numel, self.pid = key, numel, pid


def crafted_pth(path: Path, table, byteorder: bytes = b"little") -> None:
    """A torch-style zip whose data.pkl pickles `table`, with `_Storage` objects as
    persistent storages (or their raw `pid`) and tuples (rebuild args…) as
    `_rebuild_tensor_v2` calls; its 64-byte storage "0" follows."""

    class Rebuild:
        def __init__(self, args):
            self.args = args

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                if obj.pid is not None:
                    return obj.pid
                return ("storage", torch.BFloat16Storage, obj.key, "cpu", obj.numel)
            return None

    def convert(value):
        if isinstance(value, tuple) and value and value[0] == "rebuild":
            return Rebuild(value[1:])
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(convert(table))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("consolidated/data.pkl", buffer.getvalue())
        archive.writestr("consolidated/byteorder", byteorder)
        archive.writestr("consolidated/data/0", bytes(64))


def tensor(storage=None, offset=0, shape=(4,), stride=(1,)):
    storage = _Storage("0", 32) if storage is None else storage
    return ("rebuild", storage, offset, shape, stride, False, {})


# name → (data.pkl's table, the one-line message expected)
CRAFTED = {
    "shape-of-strings": ({"w": tensor(shape=("a", "b"))}, "shape is not a non-negative integer"),
    "storage-is-an-int": ({"w": tensor(storage=7)}, "storage is not a storage"),
    "offset-is-a-list": ({"w": tensor(offset=[0])}, "offset is not a non-negative integer"),
    "negative-size": ({"w": tensor(shape=(-4,))}, "shape is not a non-negative integer"),
    "storage-key-is-a-list": ({"w": tensor(_Storage(["0"], 32))}, "key is not a string"),
    "numel-is-a-string": ({"w": tensor(_Storage("0", "32"))}, "size is not a non-negative"),
    "key-not-a-string": ({5: tensor()}, "not hold a flat dict of name → tensor"),
    "not-a-dict": ([1, 2, 3], "not hold a flat dict of name → tensor"),
    "huge-shape": (
        {"w": tensor(shape=(2**62, 2**62), stride=(2**62, 1))},
        "tensor w lies outside its storage",
    ),
    "offset-outside-storage": ({"w": tensor(offset=30)}, "tensor w lies outside its storage"),
    "storage-longer-than-its-entry": (
        {"w": tensor(_Storage("0", 33))},
        "holds 64 bytes, its storage needs 66",
    ),
    "storage-entry-missing": ({"w": tensor(_Storage("1", 32))}, "entry consolidated/data/1 is"),
    "bad-persistent-id": (
        {"w": tensor(_Storage("0", 32, pid=("module", "os.system")))},
        "unsupported persistent id",
    ),
    "unsupported-storage-type": (
        {"w": tensor(_Storage("0", 32, pid=("storage", "BFloat16", "0", "cpu", 32)))},
        "unsupported storage type",
    ),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    pth = write_tiny_checkpoint(root / "pth", ARGS)
    st = write_tiny_checkpoint(root / "st", ARGS, weights_format="safetensors")
    convert_checkpoint(st, root / "converted")
    convert_checkpoint(st, root / "hf", layout="hf")
    return {"pth": pth, "st": st, "converted": root / "converted", "hf": root / "hf"}


def assert_only_checkpoint_errors(call, what: str) -> None:
    try:
        call()
    except CheckpointError as err:
        assert "\n" not in str(err), f"{what}: a multi-line message {err!r}"
    except Exception as err:  # the property under test: nothing else may escape
        raise AssertionError(f"{what}: {type(err).__name__} escaped: {err}") from err


def assert_converts_or_fails_cleanly(src: Path, work: Path, what: str) -> None:
    out = work / "out"
    assert_only_checkpoint_errors(lambda: convert_checkpoint(src, out), what)
    if not (out / "manifest.json").exists():  # it failed: nothing of it may remain
        leftovers = [p.name for p in work.iterdir() if p.name.startswith((".out", "out"))]
        assert not leftovers, f"{what}: left {leftovers}"
    shutil.rmtree(out, ignore_errors=True)


def mutated_copies(folder: Path, name: str, mutations: list[bytes], work: Path):
    for i, data in enumerate(mutations):
        case = work / f"case-{i}"
        shutil.copytree(folder, case)
        (case / name).write_bytes(data)
        yield i, case
        shutil.rmtree(case)


@pytest.mark.slow
def test_mutated_pth_files(corpus, tmp_path):
    data = (corpus["pth"] / "consolidated.00.pth").read_bytes()
    rng = random.Random(0)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    region = (info.header_offset, info.header_offset + 30 + len(info.filename) + info.file_size)
    mutations = [truncate(data, rng) for _ in range(8)] + [flip(data, rng) for _ in range(8)]
    mutations += [flip(data, rng, region) for _ in range(CASES_PER_KIND)]
    for i, case in mutated_copies(corpus["pth"], "consolidated.00.pth", mutations, tmp_path):
        what = f"pth mutation {i}"
        assert_only_checkpoint_errors(lambda c=case: open_folder(c), what)
        assert_only_checkpoint_errors(lambda c=case: ReferenceLoader(c), f"{what} (torch)")
        assert_converts_or_fails_cleanly(case, tmp_path, what)


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_pickles_are_refused_in_one_line(corpus, tmp_path, name):
    case = tmp_path / "case"
    shutil.copytree(corpus["pth"], case)
    table, message = CRAFTED[name]
    crafted_pth(case / "consolidated.00.pth", table)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: ") as refused:
        open_folder(case)
    assert message in str(refused.value)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: "):
        ReferenceLoader(case)
    assert_converts_or_fails_cleanly(case, tmp_path, name)


def test_a_big_endian_checkpoint_is_refused(corpus, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(corpus["pth"], case)
    crafted_pth(case / "consolidated.00.pth", {"w": tensor()}, byteorder=b"big")
    with pytest.raises(CheckpointError, match=r"\.pth: big-endian checkpoints are not supp"):
        open_folder(case)


def test_a_storage_running_past_the_end_of_the_file_is_refused(corpus, tmp_path):
    """The storage's local zip header claims a long extra field: its bytes would start (and
    end) past the end of the file."""
    case = tmp_path / "case"
    shutil.copytree(corpus["pth"], case)
    path = case / "consolidated.00.pth"
    crafted_pth(path, {"w": tensor()})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        header = archive.getinfo("consolidated/data/0").header_offset
    data[header + 28 : header + 30] = struct.pack("<H", 0xFFFF)  # extra field length
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"\.pth: storage of w runs past the end of"):
        open_folder(case)


@pytest.mark.slow
def test_a_pickle_that_would_inflate_to_gigabytes_is_refused_before_reading(corpus, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(corpus["pth"], case)
    with zipfile.ZipFile(case / "consolidated.00.pth", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("consolidated/data.pkl", b"\x80\x02" + bytes(256 * 2**20))
    for load in (open_folder, ReferenceLoader):
        with pytest.raises(CheckpointError, match=r"data\.pkl declares .* bytes, more than"):
            load(case)


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(path, framework="numpy"):
            return True
    except SafetensorError:
        return False


def our_verdict(path: Path) -> str:
    """ "ok", "unsupported" (a valid file of a dtype no release uses) or "refused"."""
    try:
        read_safetensors_table(path)
        return "ok"
    except CheckpointError as err:
        return "unsupported" if "unsupported dtype" in str(err) else "refused"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_mutated_safetensors_files(corpus, tmp_path, seed):
    data = (corpus["st"] / "consolidated.safetensors").read_bytes()
    mutations = safetensors_mutations(data, seed)
    for i, case in mutated_copies(corpus["st"], "consolidated.safetensors", mutations, tmp_path):
        what = f"safetensors mutation {seed}/{i}"
        weights = case / "consolidated.safetensors"
        library, ours = library_accepts(weights), our_verdict(weights)
        assert library == (ours != "refused") or ours == "unsupported", f"{what}: {ours}, {library}"
        assert_only_checkpoint_errors(lambda c=case: open_folder(c), what)
        assert_only_checkpoint_errors(lambda c=case: ReferenceLoader(c), f"{what} (torch)")
        assert_converts_or_fails_cleanly(case, tmp_path, what)


def test_mutated_params_json(corpus, tmp_path):
    data = (corpus["st"] / "params.json").read_bytes()
    for i, case in mutated_copies(corpus["st"], "params.json", json_mutations(data, 1), tmp_path):
        what = f"params.json mutation {i}"
        assert_only_checkpoint_errors(lambda c=case: ModelArgs.from_json(c / "params.json"), what)
        assert_converts_or_fails_cleanly(case, tmp_path, what)


def test_mutated_hf_config_json(corpus, tmp_path):
    data = (corpus["hf"] / "config.json").read_bytes()
    for i, case in mutated_copies(corpus["hf"], "config.json", json_mutations(data, 2), tmp_path):
        (case / "manifest.json").unlink()  # an HF folder as users have them
        what = f"config.json mutation {i}"
        assert_only_checkpoint_errors(lambda c=case: open_source(c), what)
        assert_converts_or_fails_cleanly(case, tmp_path, what)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors.index.json", "manifest.json"])
def test_mutated_index_and_manifest_never_escape_check(corpus, tmp_path, name):
    data = (corpus["converted"] / name).read_bytes()
    for i, case in mutated_copies(corpus["converted"], name, json_mutations(data, 3), tmp_path):
        what = f"{name} mutation {i}"
        problems = check_converted(case)  # a list of lines, never an exception
        assert all(isinstance(p, str) and "\n" not in p for p in problems), what
        if name.startswith("model"):
            assert_only_checkpoint_errors(lambda c=case: open_folder(c), what)
            assert_only_checkpoint_errors(lambda c=case: ReferenceLoader(c), f"{what} (torch)")
