"""The tokenizer of a checkpoint folder, through mistral-common (the official library).

A folder holds exactly one tokenizer file, found as mistral-inference's `load_tokenizer` finds
it: whatever mistral-common recognises — `tokenizer.model`, `tokenizer.model.v1/v2/v3/v7…`
(sentencepiece) or `tekken.json` (tiktoken-style BPE). Text prompts get BOS prepended as the
official `generate` does; chat messages are rendered by mistral-common's instruct tokenizer.
"""

from pathlib import Path

from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import is_tekken

from checkpoint.errors import CheckpointError

ROLES = ("system", "user", "assistant")


def is_tokenizer_file(path: Path) -> bool:
    """Whether mistral-common recognises `path` as a tokenizer (sentencepiece or tekken)."""
    return is_sentencepiece(path) or is_tekken(path)


def find_tokenizer(folder: str | Path) -> Path:
    """The one tokenizer file in `folder`; CheckpointError naming what was found otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "not a directory")
    found = sorted(p for p in folder.iterdir() if is_tokenizer_file(p))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(
            folder,
            f"expected exactly one tokenizer file (tokenizer.model[.vN] or tekken.json), "
            f"found {names}",
        )
    return found[0]


class Tokenizer:
    """mistral-common's tokenizer for one file: ids, BOS/EOS, text and chat encoding."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "file not found")
        try:
            self._mistral = MistralTokenizer.from_file(str(path))
        except Exception as err:  # mistral-common raises many types for foreign files
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(path, f"not a Mistral tokenizer ({reason})") from None
        self._raw = self._mistral.instruct_tokenizer.tokenizer
        self.path = path

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        return cls(find_tokenizer(folder))

    @property
    def vocab_size(self) -> int:
        return self._raw.n_words

    @property
    def bos_id(self) -> int:
        return self._raw.bos_id

    @property
    def eos_id(self) -> int:
        return self._raw.eos_id

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return self._raw.encode(text, bos=bos, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self._raw.decode(ids)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat (`[{"role": "user", "content": ...}, ...]`), as the instruct
        models were trained on it; ValueError naming the problem for a malformed chat."""
        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        parsed = []
        for message in messages:
            if (
                not isinstance(message, dict)
                or message.get("role") not in kinds
                or not isinstance(message.get("content"), str)
            ):
                raise ValueError(
                    f"each message needs a role ({', '.join(ROLES)}) and a string content, "
                    f"got {message!r:.80}"
                )
            parsed.append(kinds[message["role"]](content=message["content"]))
        try:
            request = ChatCompletionRequest(messages=parsed)
            return self._mistral.encode_chat_completion(request).tokens
        except Exception as err:  # mistral-common validates the conversation's order
            raise ValueError(f"chat rejected by mistral-common ({err})") from None

    def check_vocab(self, vocab_size: int, params_path: str | Path) -> None:
        """CheckpointError naming both files when the vocabulary differs from params.json."""
        if self.vocab_size != vocab_size:
            raise CheckpointError(
                self.path,
                f"vocabulary has {self.vocab_size} tokens but {params_path} says vocab_size "
                f"{vocab_size}",
            )
