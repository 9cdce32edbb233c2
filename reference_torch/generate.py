"""Greedy generation with the torch reference, one prompt at a time (mistral-inference
`generate.py` with temperature 0): chunked prefill into the rolling cache, then decode, the
first new token at position L. The ground truth for generation agreement."""

import torch

from reference_torch.cache import RollingKVCache
from reference_torch.model import Transformer


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    chunk_size: int | None = None,
    eos_id: int | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations (prompt excluded, EOS kept) and their log-probabilities."""
    args = model.args
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    chunk = chunk_size or args.shortest_window or 2048
    results, logprobs = [], []
    for prompt in prompts:
        cache = RollingKVCache(args, 1, len(prompt) + max_new_tokens, dtype=dtype, device=device)
        for start in range(0, len(prompt), chunk):
            piece = torch.tensor([prompt[start : start + chunk]], device=device)
            logits = model(piece, cache)[0, -1]
        tokens, scores = [], []
        for _ in range(max_new_tokens):
            token = int(torch.argmax(logits))
            tokens.append(token)
            scores.append(float(torch.log_softmax(logits, -1)[token]))
            if token == eos_id or len(tokens) == max_new_tokens:
                break
            logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
        results.append(tokens)
        logprobs.append(scores)
    return results, logprobs
