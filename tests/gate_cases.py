"""The clean-vs-fault table behind verify's gates: two tiny configs (random weights, and
trained-like weights with massive activations and attention sinks), prompts of 1–700 tokens
with and without BOS, and every fault of tests/faults.py in an early, middle and late block.

Used by tests/test_gates.py (assertions) and benchmarks/gate_table.py (the README table)."""

import contextlib
import dataclasses
import shutil
from pathlib import Path

import torch
from faults import CODE_FAULTS, WEIGHT_FAULTS
from support import tiny_args

from checkpoint.tiny import bundled_tokenizer, random_state_dict, write_tiny_checkpoint
from checkpoint.tokenizer import Tokenizer
from checkpoint.trained_like import trained_like_state_dict
from convert.convert import convert_checkpoint
from verify import runners
from verify.prompts import _LONG, chat_prompt, text_prompt
from verify.results import Report
from verify.run import run_verification

CONFIGS = {
    # GQA, head_dim ≠ dim / n_heads, a 32-token window shorter than the long prompts.
    "random": tiny_args(n_layers=6, vocab_size=32000, sliding_window=32),
    # The smallest shape the massive-activation mechanism supports (checkpoint/trained_like.py).
    "trained-like": tiny_args(dim=128, n_layers=6, head_dim=32, hidden_dim=256, vocab_size=32000),
}
# A fault goes into the early, middle and late block at once. Teacher forcing feeds every block
# the reference's own input, so each block is judged alone: exactly these blocks must fail.
FAULTY_BLOCKS = (1, 3, 5)
SEEDS = (0, 1, 2)


def prompts() -> list:
    """1 to 641 tokens; text with and without BOS, and a chat."""
    tokenizer = Tokenizer(bundled_tokenizer(32000))
    return [
        text_prompt("x", tokenizer, bos=False),  # one token, no BOS
        text_prompt("The capital of France is", tokenizer),
        chat_prompt([{"role": "user", "content": "Name three grey cats."}], tokenizer),
        text_prompt(_LONG[:250], tokenizer, bos=False),  # 50 tokens, no BOS
        text_prompt(_LONG, tokenizer),  # 641 tokens
    ]


def write_source(config: str, seed: int, folder: Path, fault: str | None = None):
    """An official-format bf16 folder of `config`, with a weight fault in FAULTY_BLOCKS."""
    args = CONFIGS[config]
    build = trained_like_state_dict if config == "trained-like" else random_state_dict
    state = {k: v.to(torch.bfloat16) for k, v in build(args, seed=seed).items()}
    for block in FAULTY_BLOCKS if fault is not None else ():
        WEIGHT_FAULTS[fault](state, args, block)
    write_tiny_checkpoint(folder, args, seed=seed, state=state)
    return folder


@contextlib.contextmanager
def code_fault(fault: str):
    """While active, the port's bf16 FAULTY_BLOCKS run with the bf16 numerics bug `fault`."""
    original = runners.JaxRunner.block

    def faulty(self, i, dtype):
        loaded = original(self, i, dtype)
        return CODE_FAULTS[fault](loaded) if i in FAULTY_BLOCKS and dtype == "bfloat16" else loaded

    runners.JaxRunner.block = faulty
    try:
        yield
    finally:
        runners.JaxRunner.block = original


@dataclasses.dataclass(frozen=True)
class Case:
    config: str
    seed: int
    fault: str | None  # None: clean
    dtype: str = "bfloat16"

    @property
    def id(self) -> str:
        return f"{self.config}-seed{self.seed}-{self.fault or 'clean'}-{self.dtype}"


def run_case(case: Case, clean_source: Path, work: Path, prompt_list: list) -> Report:
    """Verify the port of `clean_source` with `case`'s fault against the clean reference."""
    source = clean_source
    if case.fault in WEIGHT_FAULTS:
        source = write_source(case.config, case.seed, work / "faulty", case.fault)
    converted = work / "converted"
    shutil.rmtree(converted, ignore_errors=True)
    convert_checkpoint(source, converted)
    shutil.rmtree(work / "faulty", ignore_errors=True)
    injected = code_fault(case.fault) if case.fault in CODE_FAULTS else None
    with injected or contextlib.nullcontext():
        return run_verification(
            clean_source, converted, dtype=case.dtype, prompts=prompt_list, stream_layers=True
        )


def cases() -> list[Case]:
    """Clean runs for every seed; every fault (seed 0); fp32 clean and weight faults."""
    out = [Case(c, s, None) for c in CONFIGS for s in SEEDS]
    out += [Case(c, 0, f) for c in CONFIGS for f in [*WEIGHT_FAULTS, *CODE_FAULTS]]
    out += [Case(c, 0, None, "float32") for c in CONFIGS]
    out += [Case("random", 0, f, "float32") for f in WEIGHT_FAULTS]
    return out
