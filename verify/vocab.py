"""The vocabulary tables read a part at a time when verify streams (`--stream-layers`): a
Mistral Large 3 or Small 3 head of 131,072 rows is 7.5 GB (resp. 5 GB) in float64, the dtype
of the reference's truth. The embeddings are read for the prompts' tokens only; a head whose
float64 copy exceeds `HEAD_BYTES` a slice of rows at a time, every prompt run through each
slice before the next is read.

The shell with its table narrowed to some rows is the model's own: `embed` looks up each token
at its row in the narrowed table, `head` computes those rows' logits with the same norm and
matmul, so the embeddings are the same numbers as the whole table's and the logits too but for
the matmul's summation order (torch: float64 within ~1e-16, fp32 and bf16 the same bits in the
tests here; XLA within one rounding of the dtype).
"""

import itertools

import numpy as np

from checkpoint.args import ModelArgs
from verify.implementation import Implementation

HEAD_BYTES = 1 << 30  # float64 bytes of the head read at once: a 7B's (32768 × 4096) whole
ROW_MULTIPLE = 256  # slices a multiple of these rows: whole over a mesh's vocabulary axis


def head_rows(args: ModelArgs) -> int:
    """Rows of the head read at once: all of them where the float64 head fits `HEAD_BYTES`,
    else the most within it, a multiple of `ROW_MULTIPLE` (at least that many)."""
    rows = HEAD_BYTES // (8 * args.dim)
    if rows >= args.vocab_size:
        return args.vocab_size
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


def embed_prompts(runner: Implementation, dtype: str, prompts: list[list[int]]) -> list:
    """Each prompt's embeddings (T, dim); with `runner.vocab_rows` (streamed), only the
    prompts' tokens' rows read."""
    if runner.vocab_rows is None:
        shell = runner.shell("embed", dtype)
        return [runner.embed(shell, p) for p in prompts]
    rows = sorted(set(itertools.chain.from_iterable(prompts)))
    at = {token: k for k, token in enumerate(rows)}
    shell = runner.shell("embed", dtype, rows)
    return [runner.embed(shell, [at[t] for t in p]) for p in prompts]


def head_states(
    runner: Implementation, dtype: str, states: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each state's final norm and fp32 logits (T, vocab); with `runner.vocab_rows`, the
    head read that many rows at a time."""
    vocab = runner.args.vocab_size
    if runner.vocab_rows is None or runner.vocab_rows >= vocab:
        shell = runner.shell("head", dtype)
        return [runner.head(shell, h) for h in states]
    parts = []
    for first in range(0, vocab, runner.vocab_rows):
        rows = list(range(first, min(first + runner.vocab_rows, vocab)))
        shell = runner.shell("head", dtype, rows)
        parts.append([runner.head(shell, h) for h in states])
        del shell
    return [
        (parts[0][j][0], np.concatenate([part[j][1] for part in parts], axis=-1))
        for j in range(len(states))
    ]
