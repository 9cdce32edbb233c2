"""A Hugging Face hub repo id as SRC (`mistral-convert mistralai/Mistral-7B-v0.3 OUT`).

Only the files a conversion needs are fetched, as mistral-inference's README does with
`snapshot_download(allow_patterns=...)`: params.json, the consolidated weights (safetensors
before pickle) and one tokenizer (tekken before the highest `tokenizer.model.vN` before
`tokenizer.model`), or for an HF-only repo config.json, model*.safetensors and the tokenizer.
huggingface_hub's cache, token and offline mode (`HF_HUB_OFFLINE=1`) apply as usual.
"""

import contextlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from checkpoint.errors import CheckpointError
from checkpoint.folder import CONSOLIDATED_INDEX_NAME, INDEX_NAME, PTH_NAME, SAFETENSORS_NAME

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SPLIT = re.compile(r"consolidated-\d+-of-\d+\.safetensors")
_HF_SHARD = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
_TOKENIZER_VERSION = re.compile(r"tokenizer\.model\.v(\d+)(m\d+)?")


def is_repo_id(src: str) -> bool:
    """`org/name` that is not a local path."""
    return bool(REPO_ID.fullmatch(src)) and not Path(src).exists()


def tokenizer_file(names: list[str]) -> str:
    """The tokenizer to fetch: tekken, else the newest `tokenizer.model.vN`, else
    `tokenizer.model`."""
    tekken = sorted(n for n in names if "tekken" in n and n.endswith(".json"))
    versioned = sorted((int(m[1]), n) for n in names if (m := _TOKENIZER_VERSION.fullmatch(n)))
    found = (
        tekken[-1:]
        or [n for _, n in versioned[-1:]]
        or [n for n in names if n == "tokenizer.model"]
    )
    if not found:
        raise ValueError("no tokenizer.model[.vN] or tekken.json in the repo")
    return found[0]


def needed_files(names: list[str]) -> list[str]:
    """The repo files a conversion reads (top level only)."""
    top = [n for n in names if "/" not in n]
    tokenizer = tokenizer_file(top)
    if "params.json" in top:
        for weights in (CONSOLIDATED_INDEX_NAME, SAFETENSORS_NAME, PTH_NAME):
            if weights in top:
                shards = sorted(n for n in top if _SPLIT.fullmatch(n))
                extra = shards if weights == CONSOLIDATED_INDEX_NAME else []
                return ["params.json", weights, *extra, tokenizer]
    if "config.json" in top:
        shards = sorted(n for n in top if _HF_SHARD.fullmatch(n) or n == INDEX_NAME)
        if shards:
            return ["config.json", *shards, tokenizer]
    raise ValueError(
        "neither an official layout (params.json + consolidated weights) nor an HF one "
        "(config.json + model*.safetensors)"
    )


@contextlib.contextmanager
def hub_folder(repo_id: str, revision: str | None = None) -> Iterator[tuple[Path, str]]:
    """A temporary folder of links to exactly the needed files of `repo_id` (downloaded or
    found in the local cache), and the commit they come from."""
    import huggingface_hub

    try:
        try:
            names = huggingface_hub.list_repo_files(repo_id, revision=revision)
        except huggingface_hub.errors.OfflineModeIsEnabled:
            cached = huggingface_hub.snapshot_download(
                repo_id, revision=revision, local_files_only=True
            )
            names = [p.name for p in Path(cached).iterdir()]
        chosen = needed_files(names)
        snapshot = Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=chosen)
        )
    except ValueError as err:
        raise CheckpointError(repo_id, str(err)) from None
    except Exception as err:  # the hub client raises many types (HTTP, offline, not found)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            repo_id, f"not a local folder, and not available from the hub ({reason})"
        ) from None
    missing = [n for n in chosen if not (snapshot / n).is_file()]
    if missing:
        raise CheckpointError(repo_id, f"the cached snapshot lacks {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="mistral-convert-hub-") as tmp:
        for name in chosen:
            (Path(tmp) / name).symlink_to((snapshot / name).resolve())
        yield Path(tmp), snapshot.name
