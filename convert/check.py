"""`check_converted`: re-verify a converted folder against its manifest and the spec."""

from pathlib import Path

from checkpoint.errors import CheckpointError, read_json
from checkpoint.folder import INDEX_NAME, open_folder
from checkpoint.tokenizer import Tokenizer
from convert.manifest import MANIFEST_NAME, read_manifest, sha256_file
from convert.sources import open_source


def check_converted(out: str | Path) -> list[str]:
    """Every problem found, one line each naming the file or tensor; empty when intact.

    Every file of the folder must be listed in the manifest (names stay inside the folder) and
    match its size and SHA-256; the manifest must cover every file the format needs (the
    params or config, the index, every shard it names, one tokenizer); the shard headers are
    re-read, the index must map every tensor of the spec to exactly one shard, and the
    tokenizer must load with the vocabulary params.json gives.
    """
    out = Path(out)
    try:
        manifest = read_manifest(out)
    except CheckpointError as err:
        return [str(err)]
    listed = manifest["files"]
    problems = [
        f"{out / name}: not listed in the manifest"
        for name in sorted(p.name for p in out.iterdir())
        if name != MANIFEST_NAME and name not in listed
    ]
    for name, expected in listed.items():
        path = out / name
        if path.is_symlink() or not path.is_file():
            problems.append(f"{path}: missing (or not a plain file)")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(
                f"{path}: size {path.stat().st_size} bytes, manifest says {expected['bytes']}"
            )
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: SHA-256 does not match the manifest")
    try:
        hf = manifest.get("layout") == "hf"
        folder = open_source(out) if hf else open_folder(out)
        params = "config.json" if hf else "params.json"
        tokenizer = Tokenizer.from_folder(out)
        tokenizer.check_vocab(folder.args.vocab_size, out / params)
        needed = {params, INDEX_NAME, tokenizer.path.name}
        needed |= {p.name for p in folder.weights}
        problems += [
            f"{out / name}: needed but not covered by the manifest"
            for name in sorted(needed - set(listed))
        ]
        index = read_json(out / INDEX_NAME, max_bytes=64 * 2**20)
        metadata = index.get("metadata") if isinstance(index, dict) else None
        total = sum(r.nbytes for r in folder.tensors.values())
        if not isinstance(metadata, dict) or metadata.get("total_size") != total:
            problems.append(f"{out / INDEX_NAME}: metadata.total_size is not {total}")
    except CheckpointError as err:
        problems.append(str(err))
    return problems
