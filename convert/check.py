"""`check_converted`: re-verify a converted folder against its manifest and the spec."""

from pathlib import Path

from checkpoint.errors import CheckpointError, read_json
from checkpoint.folder import INDEX_NAME, open_folder
from checkpoint.spec import Roles
from checkpoint.tokenizer import Tokenizer
from convert.manifest import MANIFEST_NAME, read_manifest, sha256_file
from convert.sources import open_source


def check_converted(out: str | Path) -> list[str]:
    """Every problem found, one line each naming the file or tensor; empty when intact.

    Every file of the folder must be listed in the manifest (names stay inside the folder) and
    match its size and SHA-256; the manifest must cover every file the format needs (the
    params or config, the index, every shard it names, one tokenizer); the shard headers are
    re-read, the index must map every tensor of the spec to exactly one shard (and nothing
    else but what the tensor roles allow: FP8 scales, a declared vision encoder's tensors,
    fake-quantizer scales), the manifest's account of carried and unused tensors must match
    the folder's, and the tokenizer must load with the vocabulary params.json gives.
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
        if not hf:
            problems += _contents_problems(out, manifest.get("contents"), folder.roles)
    except CheckpointError as err:
        problems.append(str(err))
    return problems


def _contents_problems(out: Path, contents, roles: Roles) -> list[str]:
    """The manifest's carried and unused tensors against the folder's roles (manifests
    written before `contents` existed have none to compare)."""
    if contents is None:
        return []
    if not isinstance(contents, dict):
        return [f"{out / MANIFEST_NAME}: contents is not an object"]
    problems = []
    for group, found in (("carried", roles.carried), ("unused", roles.unused)):
        entry = contents.get(group, {"tensors": []})
        listed = entry.get("tensors") if isinstance(entry, dict) else None
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            problems.append(f"{out / MANIFEST_NAME}: contents.{group} is not a list of names")
            continue
        problems += [
            f"{out / INDEX_NAME}: tensor {name} is listed as {group} in the manifest but is "
            "not in the folder"
            for name in listed
            if name not in found
        ]
        problems += [
            f"{out / INDEX_NAME}: tensor {name} is {group} in the folder but not listed in the "
            "manifest"
            for name in found
            if name not in listed
        ]
    return problems
