"""One error type for every bad-input case, and the one boundary that produces it.

`reading(path)` wraps every reader: whatever a malformed file makes Python raise (a wrong type
inside a pickle, a truncated zip, JSON nested 100 000 deep, an int where a list belongs) leaves
as a `CheckpointError` whose message is a single line naming the file.
"""

import contextlib
import json
import pickle
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint file is missing, malformed or inconsistent with its params.json."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# What a malformed file can make the standard library or our parsing raise.
MALFORMED = (
    ValueError,  # includes json.JSONDecodeError and UnicodeDecodeError
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


def describe(err: BaseException) -> str:
    """A short, one-line reason for an exception."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Turn any error raised while reading `path` into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a file") from None
    except PermissionError:
        raise CheckpointError(path, "permission denied") from None
    except OSError as err:
        raise CheckpointError(path, f"cannot read ({err.strerror or describe(err)})") from None
    except MemoryError:
        raise CheckpointError(path, "too large to read") from None
    except MALFORMED as err:
        raise CheckpointError(path, f"malformed ({describe(err)})") from None


def read_json(path: str | Path, *, max_bytes: int = 2**20) -> object:
    """A JSON file of at most `max_bytes`, parsed; CheckpointError naming it otherwise."""
    path = Path(path)
    with reading(path):
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(path, f"{size} bytes, more than the {max_bytes} allowed")
        try:
            return json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(path, f"not valid JSON ({describe(err)})") from None
