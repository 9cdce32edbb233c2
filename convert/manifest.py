"""The manifest of a converted folder: SHA-256 and size of every file, the source, and its
`contents`: what was carried beside the text decoder, dequantized or left out, and why."""

import hashlib
import json
from pathlib import Path

from checkpoint.errors import CheckpointError, read_json

MANIFEST_NAME = "manifest.json"
FORMAT = "mistral-jax-port.manifest/1"


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()


def write_manifest(
    folder: Path, files: dict[str, dict], source: dict, layout: str, contents: dict | None = None
) -> None:
    manifest = {"format": FORMAT, "layout": layout, "source": source, "files": files}
    if contents is not None:
        manifest["contents"] = contents
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict:
    """The parsed manifest: {"format", "layout", "source", "files": {name: {sha256, bytes}}};
    CheckpointError naming it when it is missing or malformed."""
    path = folder / MANIFEST_NAME
    manifest = read_json(path, max_bytes=64 * 2**20)
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(path, f"not a {FORMAT} manifest")
    for name, entry in manifest["files"].items():
        if not is_plain_file_name(name):
            raise CheckpointError(path, f"entry {name!r:.80} is not a file name inside the folder")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        ):
            raise CheckpointError(path, f"entry {name} is not {{sha256, bytes}}")
    return manifest


def is_plain_file_name(name: object) -> bool:
    """A name that stays inside its folder: no separators, not '.', '..' or hidden."""
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
    )
