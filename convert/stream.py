"""Write a file from byte ranges of other files, hashing on a second thread.

Bytes move with `os.copy_file_range` (an in-kernel copy, as coreutils `cp` does) where the
platform allows, else through `os.preadv` + write via reused buffers. SHA-256 runs on a worker
thread (hashlib releases the GIL), so hashing overlaps the copy on the other core:

- after an in-kernel copy it reads the bytes just written back from *this* file's page cache
  through a short-lived read-only mapping (no extra copy); mappings are closed at once, so
  resident memory stays at a few chunks whatever the file size;
- after a buffered copy it hashes the buffer the bytes were read into.

The source is never memory-mapped: a mapped page past the end of a file that someone truncates
meanwhile kills the process with SIGBUS, whereas a read or copy of it returns a short count,
which becomes `SourceEnded` (and the caller's one-line error naming the file). What is hashed
is what was written, so the digest always describes the output.

A copy may also be inspected on the hashing thread (`copy_from(..., inspect=)`): the callback
sees each chunk just written, as the hash does, so checking the bytes (the FP8 NaN check of
`convert.fp8`) costs no extra read. Whatever it raises comes out of the next call on the writer.
"""

import collections
import concurrent.futures
import errno
import hashlib
import mmap
import os
from collections.abc import Callable

# inspect(chunk, start): a chunk of a copy just written, `start` bytes into the copy.
Inspect = Callable[[memoryview, int], None]

CHUNK_BYTES = 16 * 2**20
IN_FLIGHT = 3  # chunks queued for hashing before the copy waits
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


class SourceEnded(Exception):
    """The file being copied from ended inside the range asked for (truncated meanwhile)."""

    def __init__(self, expected: int, offset: int, got: int):
        self.expected, self.offset, self.got = expected, offset, got
        super().__init__(
            f"changed while being read (expected {expected} bytes at offset {offset}, got {got})"
        )


def read_exactly(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from `offset` of the open file `fd`; SourceEnded if the file ends first."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise SourceEnded(len(buffer), offset, done)
        done += got


class HashingWriter:
    """Sequential writer of one file that also yields its SHA-256 and size."""

    def __init__(self, path, on_bytes: Callable[[int], None] | None = None):
        # Readable too: the hashing thread maps back what the in-kernel copy wrote.
        self._file = open(path, "w+b", buffering=0)  # noqa: SIM115 (closed in close())
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

    def write_owned(self, data: memoryview) -> None:
        """Write a converted chunk the caller hands over (never touches it again); hashed on
        the second thread while the caller makes the next one."""
        self._drain(IN_FLIGHT - 1)
        self._write_all(data)
        self._pending.append(self._pool.submit(self._sha.update, data))
        self._advance(len(data))

    def copy_from(self, fd: int, offset: int, nbytes: int, inspect: Inspect | None = None) -> None:
        """Copy `nbytes` at `offset` of the open file `fd` to the end of this file;
        SourceEnded if `fd` ends before `offset + nbytes`. `inspect` sees every chunk written,
        on the hashing thread."""
        done = 0
        while done < nbytes:
            count = min(CHUNK_BYTES, nbytes - done)
            self._drain(IN_FLIGHT - 1)
            got = (
                self._copy_in_kernel(fd, offset + done, count, inspect, done)
                if self._kernel_copy
                else None
            )
            if got is None:  # no kernel copy on this platform or file system: via a buffer
                got = self._copy_buffered(fd, offset + done, count, inspect, done)
            if got <= 0:
                raise SourceEnded(nbytes, offset, done)
            done += got
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

    def _copy_in_kernel(
        self, fd: int, offset: int, count: int, inspect: Inspect | None, start: int
    ) -> int | None:
        """Bytes copied (0: the source ends at `offset`); None: no kernel copy here."""
        try:
            got = os.copy_file_range(fd, self._file.fileno(), count, offset)
        except OSError as err:
            if err.errno not in _NO_KERNEL_COPY:
                raise
            self._kernel_copy = False
            return None
        if got > 0:
            self._pending.append(
                self._pool.submit(self._hash_written, self.size, got, inspect, start)
            )
        return got

    def _copy_buffered(
        self, fd: int, offset: int, count: int, inspect: Inspect | None, start: int
    ) -> int:
        buffer = self._buffers[self._next_buffer]  # free: at most IN_FLIGHT hashes pending
        self._next_buffer = (self._next_buffer + 1) % len(self._buffers)
        view = memoryview(buffer)[:count]
        got = os.preadv(fd, [view], offset)
        if got > 0:
            self._write_all(view[:got])
            self._pending.append(self._pool.submit(self._take, view[:got], inspect, start))
        return got

    def _take(self, chunk: memoryview, inspect: Inspect | None, start: int) -> None:
        if inspect is not None:
            inspect(chunk, start)
        self._sha.update(chunk)

    def _hash_written(
        self, position: int, count: int, inspect: Inspect | None = None, start: int = 0
    ) -> None:
        """Hash (and inspect) `count` bytes of this file at `position` (written, so never past
        its end)."""
        first = position - position % mmap.ALLOCATIONGRANULARITY
        with (
            mmap.mmap(
                self._file.fileno(), position + count - first, offset=first, access=mmap.ACCESS_READ
            ) as m,
            memoryview(m) as view,
        ):
            chunk = view[position - first :]
            try:
                self._take(chunk, inspect, start)
            finally:
                chunk.release()

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[self._file.write(view) :]

    def _advance(self, nbytes: int) -> None:
        self.size += nbytes
        self._on_bytes(nbytes)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()
