"""Prompts for verify: the built-in set, or a file of text lines or JSONL records.

Built-in: short everyday questions, code, two chats rendered with the folder's instruct
tokenizer, and one text of well over 500 tokens (RoPE and sliding-window bugs hide at short
lengths; for small windows it is also longer than the window). A JSONL line is one of
`{"text": ..., "bos": true}` (BOS prepended unless `"bos": false`), `{"tokens": [...]}` (ids as
given) or `{"messages": [{"role": "user", "content": ...}, ...]}` (rendered by mistral-common).
"""

import dataclasses
import json
from pathlib import Path

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError
from checkpoint.tokenizer import Tokenizer

MAX_PROMPT_TOKENS = 32768
MAX_PROMPTS_FILE_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class Prompt:
    kind: str  # "text", "tokens", "chat" or "probe"
    text: str  # what the report shows
    tokens: tuple[int, ...]
    bos: bool  # whether the sequence starts with the BOS token
    start: int = 0  # the position of its first token (probes sit far into the context)


_LONG = " ".join(
    [
        "The history of numerical computing is a history of approximations that were trusted only",
        "after someone checked them. When the first electronic computers produced ballistic tables,",
        "the results were compared line by line against hand calculations made by teams of human",
        "computers, and a table was published only when the two agreed to the last printed digit.",
        "Later, when floating point arithmetic became standard, engineers learned that the same",
        "formula evaluated in a different order could give a different answer, and that the",
        "difference was not a bug but a property of rounding. The lesson was that agreement must be",
        "judged against the size of the rounding noise itself, not against an absolute zero.",
        "Porting a neural network from one framework to another repeats this story. The weights are",
        "the same numbers, the architecture is the same sequence of matrix products, normalisations",
        "and nonlinearities, and yet the outputs differ in the last bits because the libraries sum",
        "in different orders, fuse different operations and round at different places. In half",
        "precision these differences grow large enough to change which token is most likely at some",
        "positions, which makes a naive comparison of generated text misleading: two faithful",
        "implementations can diverge after a few dozen tokens, while a broken one can agree on a",
        "short prompt by luck. A careful comparison therefore looks inside the network. It feeds",
        "both implementations the same input, records the hidden state after every block, and asks",
        "how far apart they are relative to the noise that rounding alone would produce. It also",
        "feeds each block of the port the reference's own input for that block, so that an error in",
        "one layer cannot hide behind the accumulated noise of the layers before it. A rotary",
        "embedding applied to the wrong pairs of dimensions, a key projection swapped with a value",
        "projection, a normalisation weight read from the wrong tensor, or a sliding window that is",
        "one position too wide each leave a characteristic signature: the error jumps at one block",
        "and stays high, instead of growing smoothly from the embeddings to the logits. Long inputs",
        "matter as well, because positional encodings at small positions are nearly the identity and",
        "a window is only exercised when the sequence is longer than the window. So a good test",
        "prompt is long, varied and ordinary: it mixes prose with numbers such as 3.14159, 2718 and",
        "1,000,000, names such as Ada Lovelace, Grace Hopper and John von Neumann, and code such as",
        "for i in range(10): print(i * i). None of this needs trained weights to be useful, because",
        "the question is not whether the model is smart but whether the two programs compute the same",
        "function, layer by layer, to within the precision of the arithmetic they were asked to use.",
        "When the answer is yes, the report should say so with numbers, and when the answer is no, it",
        "should say exactly where the two programs part ways, which block, which mode, and by how",
        "much more than the noise floor, so that the engineer who reads it knows where to look first.",
    ]
)

_CHATS = [
    [{"role": "user", "content": "Can you suggest three names for a grey cat?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "How many legs does a spider have?"},
        {"role": "assistant", "content": "Eight."},
        {"role": "user", "content": "And an ant?"},
    ],
]
_TEXTS = [
    "The capital of France is",
    "What is the boiling point of water at sea level, in degrees Celsius?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Mistral 7B is a language model with grouped-query attention and a sliding window.",
    _LONG,
]


def builtin_prompts(tokenizer: Tokenizer) -> list[Prompt]:
    texts = [text_prompt(t, tokenizer) for t in _TEXTS]
    return texts[:-1] + [chat_prompt(m, tokenizer) for m in _CHATS] + texts[-1:]


PROBE_TEXT = "Far into a long context, the same words must mean the same thing."


def position_probes(args: ModelArgs, tokenizer: Tokenizer) -> list[Prompt]:
    """A short text placed at far positions, for configs whose positions change the model's
    arithmetic far out (YaRN, Llama-4 scaling): at the scaling's original length, 8× it (for
    Ministral 3: 16k and 128k) and the last positions `max_position_embeddings` allows — so
    every block is judged there without a prompt that long."""
    scaling = args.llama_4_scaling or args.yarn
    if scaling is None:
        return []
    tokens = tuple(tokenizer.encode(PROBE_TEXT, bos=False))
    original = scaling.original_max_position_embeddings
    limit = args.max_position_embeddings or 16 * original
    starts = sorted(
        {s for s in (original, 8 * original, limit - len(tokens)) if 0 < s <= limit - len(tokens)}
    )
    return [
        Prompt("probe", f"{PROBE_TEXT} (positions {s}–{s + len(tokens) - 1})", tokens, False, s)
        for s in starts
    ]


def text_prompt(text: str, tokenizer: Tokenizer, *, bos: bool = True) -> Prompt:
    return Prompt("text", text, tuple(tokenizer.encode(text, bos=bos)), bos)


def chat_prompt(messages: list[dict], tokenizer: Tokenizer) -> Prompt:
    tokens = tuple(tokenizer.encode_chat(messages))
    shown = " | ".join(f"{m['role']}: {m['content']}" for m in messages)
    return Prompt("chat", shown, tokens, tokens[:1] == (tokenizer.bos_id,))


def read_prompts(path: Path, tokenizer: Tokenizer) -> list[Prompt]:
    """Prompts from a file: JSONL when a line starts with `{`, else one text per line."""
    try:
        if path.stat().st_size > MAX_PROMPTS_FILE_BYTES:
            raise CheckpointError(path, f"larger than {MAX_PROMPTS_FILE_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except UnicodeDecodeError:
        raise CheckpointError(path, "not a UTF-8 text file") from None
    except OSError as err:
        raise CheckpointError(path, f"cannot read ({err.strerror or err})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise CheckpointError(path, "no prompts in the file")
    jsonl = any(line.lstrip().startswith("{") for _, line in lines)
    prompts = []
    for n, line in lines:
        try:
            prompt = _record(line, tokenizer) if jsonl else text_prompt(line, tokenizer)
        except ValueError as err:
            raise CheckpointError(f"{path}:{n}", str(err)) from None
        if not prompt.tokens:
            raise CheckpointError(f"{path}:{n}", "the prompt has no tokens")
        if len(prompt.tokens) > MAX_PROMPT_TOKENS:
            raise CheckpointError(
                f"{path}:{n}",
                f"the prompt has {len(prompt.tokens)} tokens, more than the limit of "
                f"{MAX_PROMPT_TOKENS}",
            )
        prompts.append(prompt)
    return prompts


def _record(line: str, tokenizer: Tokenizer) -> Prompt:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"not a JSON object ({err})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    kinds = [k for k in ("text", "tokens", "messages") if k in record]
    unknown = sorted(set(record) - {"text", "tokens", "messages", "bos"})
    if len(kinds) != 1 or unknown:
        raise ValueError('expected exactly one of "text", "tokens", "messages" (and "bos")')
    bos = record.get("bos", True)
    if not isinstance(bos, bool) or ("bos" in record and kinds != ["text"]):
        raise ValueError('"bos" is a boolean and goes with "text" only')
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError('"text" must be a string')
        return text_prompt(record["text"], tokenizer, bos=bos)
    if "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise ValueError('"messages" must be a non-empty list')
        return chat_prompt(record["messages"], tokenizer)
    tokens = record["tokens"]
    vocab = tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
    ):
        raise ValueError(f'"tokens" must be a list of ids in [0, {vocab})')
    shown = tokenizer.decode(tokens)
    return Prompt("tokens", shown, tuple(tokens), tokens[:1] == [tokenizer.bos_id])
