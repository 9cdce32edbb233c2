"""Creating folders and files without ever replacing something that is not ours.

`rename_without_replacing` is rename(2) that fails instead of replacing (renameat2 with
RENAME_NOREPLACE where the kernel and file system offer it; a check-then-rename otherwise).
`new_folder` builds a folder in a hidden sibling and moves it into place only when complete.
"""

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from checkpoint.errors import CheckpointError


def rename_without_replacing(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; CheckpointError naming `dst` if something is already there."""
    if _renameat2 is not None:
        if _renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # NOREPLACE
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise CheckpointError(dst, "appeared meanwhile; left untouched") from None
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the file system lacks the flag
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise CheckpointError(dst, "appeared meanwhile; left untouched")
    os.rename(src, dst)


@contextlib.contextmanager
def new_folder(target: Path) -> Iterator[Path]:
    """A hidden sibling to fill; it becomes `target` when the block succeeds and is removed
    when it fails. `target` must not exist, or be an empty folder (which is taken)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(target, "already exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield building
        if target.is_dir():
            target.rmdir()  # fails, safely, if anything was put there meanwhile
        rename_without_replacing(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    text, fd = ctypes.c_char_p, ctypes.c_int
    function.argtypes = [fd, text, fd, text, ctypes.c_uint]
    return function


_renameat2 = _load_renameat2()
