"""The manifest of a converted folder: SHA-256 and size of every file, and the source."""

import hashlib
import json
from pathlib import Path

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


def write_manifest(folder: Path, files: dict[str, dict], source: dict, layout: str) -> None:
    manifest = {"format": FORMAT, "layout": layout, "source": source, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict:
    """The parsed manifest; ValueError with the reason when it is missing or malformed."""
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ValueError(f"not a {FORMAT} manifest")
    return manifest
