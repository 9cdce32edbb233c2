"""Write a file from byte ranges of other files, hashing on a second thread.

Bytes move with `os.copy_file_range` (an in-kernel copy, as coreutils `cp` does) where the
platform allows, else through `os.preadv` + write via reused buffers. SHA-256 runs on a worker
thread (hashlib releases the GIL) that reads each copied range back from the page cache through
a short-lived mapping, so hashing overlaps the copy on the other core and costs no extra copy;
mappings are closed at once, so resident memory stays at a few chunks whatever the file size.
"""

import collections
import concurrent.futures
import errno
import hashlib
import mmap
import os
from collections.abc import Callable

CHUNK_BYTES = 16 * 2**20
IN_FLIGHT = 3  # chunks queued for hashing before the copy waits
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


class SourceEnded(Exception):
    """The file being copied from ended before the range asked for (truncated meanwhile)."""


class HashingWriter:
    """Sequential writer of one file that also yields its SHA-256 and size."""

    def __init__(self, path, on_bytes: Callable[[int], None] | None = None):
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in close())
        self._sha = hashlib.sha256()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending: collections.deque = collections.deque()
        self._buffers = [bytearray(CHUNK_BYTES) for _ in range(IN_FLIGHT + 1)]
        self._next_buffer = 0
        self._on_bytes = on_bytes or (lambda n: None)
        self._kernel_copy = hasattr(os, "copy_file_range")
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Write small data (headers, converted chunks); hashed inline."""
        self._drain(0)
        self._write_all(memoryview(data))
        self._sha.update(data)
        self._advance(len(data))

    def copy_from(self, fd: int, offset: int, nbytes: int) -> None:
        """Copy `nbytes` at `offset` of the open file `fd` to the end of this file."""
        end = offset + nbytes
        while offset < end:
            count = min(CHUNK_BYTES, end - offset)
            self._drain(IN_FLIGHT - 1)
            got = self._copy_in_kernel(fd, offset, count) if self._kernel_copy else 0
            if got:
                self._pending.append(self._pool.submit(self._hash_mapped, fd, offset, got))
            else:  # no kernel copy on this platform or file system: go through a buffer
                got = self._copy_buffered(fd, offset, count)
            offset += got
            self._advance(got)

    def close(self) -> str:
        """Finish writing; return the hex SHA-256 of everything written."""
        self._drain(0)
        self._pool.shutdown()
        self._file.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._file.close()

    def _copy_in_kernel(self, fd: int, offset: int, count: int) -> int:
        try:
            got = os.copy_file_range(fd, self._file.fileno(), count, offset)
        except OSError as err:
            if err.errno not in _NO_KERNEL_COPY:
                raise
            self._kernel_copy = False
            return 0
        if got <= 0:
            raise SourceEnded(f"ended at byte {offset}, before the range to copy")
        return got

    def _copy_buffered(self, fd: int, offset: int, count: int) -> int:
        buffer = self._buffers[self._next_buffer]  # free: at most IN_FLIGHT hashes pending
        self._next_buffer = (self._next_buffer + 1) % len(self._buffers)
        view = memoryview(buffer)[:count]
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise SourceEnded(f"ended at byte {offset}, before the range to copy")
        self._write_all(view[:got])
        self._pending.append(self._pool.submit(self._sha.update, view[:got]))
        return got

    def _hash_mapped(self, fd: int, offset: int, count: int) -> None:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with (
            mmap.mmap(fd, offset + count - start, offset=start, access=mmap.ACCESS_READ) as m,
            memoryview(m) as view,
        ):
            self._sha.update(view[offset - start :])

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[self._file.write(view) :]

    def _advance(self, nbytes: int) -> None:
        self.size += nbytes
        self._on_bytes(nbytes)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()
