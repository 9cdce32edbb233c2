"""`check_converted`: re-verify a converted folder against its manifest and the spec."""

import json
from pathlib import Path

from checkpoint.errors import CheckpointError
from checkpoint.folder import INDEX_NAME, open_folder
from convert.manifest import MANIFEST_NAME, read_manifest, sha256_file
from convert.sources import open_source


def check_converted(out: str | Path) -> list[str]:
    """Every problem found, one line each naming the file or tensor; empty when intact.

    Re-hashes every file listed in the manifest, re-reads every shard header, and checks that
    the index maps every tensor of the params.json spec to exactly one shard that holds it.
    """
    out = Path(out)
    try:
        manifest = read_manifest(out)
    except ValueError as err:
        return [f"{out / MANIFEST_NAME}: {err}"]
    problems = []
    for name, expected in manifest["files"].items():
        path = out / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected.get("bytes"):
            problems.append(
                f"{path}: size {path.stat().st_size} bytes, manifest says {expected.get('bytes')}"
            )
        elif sha256_file(path) != expected.get("sha256"):
            problems.append(f"{path}: SHA-256 does not match the manifest")
    unlisted = sorted(p.name for p in out.glob("*.safetensors") if p.name not in manifest["files"])
    problems += [f"{out / name}: not listed in the manifest" for name in unlisted]
    try:
        folder = open_source(out) if manifest.get("layout") == "hf" else open_folder(out)
    except CheckpointError as err:
        return [*problems, str(err)]
    index = json.loads((out / INDEX_NAME).read_text())
    total = sum(r.nbytes for r in folder.tensors.values())
    if index.get("metadata", {}).get("total_size") != total:
        problems.append(f"{out / INDEX_NAME}: metadata.total_size is not {total}")
    return problems
