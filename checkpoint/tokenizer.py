"""The sentencepiece tokenizer of a checkpoint folder: BOS prepended on encode, as the
official `generate` does (mistral-inference `tokenizer.py`)."""

from pathlib import Path

import sentencepiece

from checkpoint.errors import CheckpointError


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "file not found")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise CheckpointError(path, f"not a sentencepiece model ({err})") from None
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)
