"""Where a conversion's output goes, without ever losing what was there.

- OUT = SRC, OUT inside SRC, SRC inside OUT, and an OUT that holds the working directory are
  refused; an existing OUT is replaced only with `overwrite` and only if this toolkit wrote it
  (its manifest.json).
- One conversion per OUT at a time: a lock file beside it; a second run exits with an error.
- The output is built in a hidden sibling and moved into place with a rename that never
  replaces anything (`checkpoint.safe_files`): a folder that appeared at OUT meanwhile stays,
  and this run fails instead.
- Hidden siblings carry their owner's pid and host in their name; the next run removes those of
  processes that are gone (a SIGKILLed run leaves one), and names what it cannot attribute.
"""

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from checkpoint.errors import CheckpointError
from checkpoint.safe_files import rename_without_replacing
from convert.manifest import MANIFEST_NAME, read_manifest

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_LEFTOVER = re.compile(r"\.(partial|old)-(\d+)-(.+)-[a-z0-9_]{8}$")


def check_destination(src: Path | None, out: Path, overwrite: bool) -> None:
    """CheckpointError unless writing `out` (from `src`) can lose nothing of the user's."""
    target = out.resolve()
    if src is not None:
        source = src.resolve()
        if target == source:
            raise CheckpointError(out, "is the source folder itself")
        if target.is_relative_to(source):
            raise CheckpointError(out, f"is inside the source folder {src}")
        if source.is_relative_to(target):
            raise CheckpointError(out, f"contains the source folder {src}")
    if Path.cwd().resolve().is_relative_to(target):
        raise CheckpointError(out, "is (or contains) the current directory")
    if out.is_symlink():
        raise CheckpointError(out, "is a symbolic link; refusing to replace it")
    if not out.exists():
        return
    if not overwrite:
        raise CheckpointError(out, "already exists (pass --overwrite to replace it)")
    if not out.is_dir():
        raise CheckpointError(out, "exists and is not a directory")
    if not (out / MANIFEST_NAME).is_file():
        raise CheckpointError(
            out, "was not written by mistral-convert (no manifest.json); refusing to replace it"
        )
    read_manifest(out)  # a manifest of ours, not any file of that name


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside OUT for the whole run; another live holder is an error."""
    lock = out.parent / f".{out.name}.lock"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _owner(lock.read_text(errors="replace").split())
            if attempt == 0 and owner is not None and not _alive(*owner):
                lock.unlink(missing_ok=True)  # left by a run that is gone
                continue
            raise CheckpointError(
                out,
                f"another mistral-convert is writing it ({lock} is held"
                f"{f' by pid {owner[0]} on {owner[1]}' if owner else ''}); if no conversion "
                "is running, remove that file",
            ) from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {_HOST}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def remove_leftovers(out: Path) -> list[str]:
    """Remove hidden siblings of OUT left by runs that are gone; name the ones it cannot
    attribute (returned as notes)."""
    notes = []
    for path in sorted(out.parent.glob(f".{glob_escape(out.name)}.*-*")):
        match = _LEFTOVER.fullmatch(path.name[len(out.name) + 1 :])
        if not path.is_dir():
            continue
        if match is None:
            if ".partial-" in path.name or ".old-" in path.name:
                notes.append(f"{path}: left by an earlier run; remove it if nothing uses it")
            continue
        if not _alive(int(match[2]), match[3]):
            shutil.rmtree(path, ignore_errors=True)
    return notes


def new_partial(out: Path) -> Path:
    """An empty hidden sibling of OUT to build the output in, named after this process."""
    partial = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-{_HOST}-", dir=out.parent)
    )
    partial.chmod(0o777 & ~_umask())
    return partial


def publish(partial: Path, out: Path) -> None:
    """Move the finished `partial` to OUT. An OUT of ours (checked again now) is swapped out
    and removed; anything that appeared at OUT since the start makes this fail, untouched."""
    if not out.exists():
        rename_without_replacing(partial, out)
        return
    if not (out / MANIFEST_NAME).is_file():
        raise CheckpointError(out, "appeared while converting and is not ours; left untouched")
    old = Path(tempfile.mkdtemp(prefix=_sibling(out, "old"), dir=out.parent))
    old.rmdir()  # only the unique name is wanted
    out.rename(old)
    try:
        rename_without_replacing(partial, out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sibling(out: Path, kind: str) -> str:
    """Prefix of a hidden sibling's name: `.OUT.kind-PID-HOST-` (mkdtemp adds 8 characters)."""
    return f".{out.name}.{kind}-{os.getpid()}-{_HOST}-"


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _owner(fields: list[str]) -> tuple[int, str] | None:
    if len(fields) == 2 and fields[0].isdigit():
        return int(fields[0]), fields[1]
    return None


def _alive(pid: int, host: str) -> bool:
    """Whether the process may still run (another host's processes are assumed alive)."""
    if host != _HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
