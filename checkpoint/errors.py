"""One error type for every bad-input case; its message is a single line naming the file."""

from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint file is missing, malformed or inconsistent with its params.json."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
