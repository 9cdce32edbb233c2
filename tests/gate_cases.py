"""The clean-vs-fault table behind verify's gates: tiny configs built to behave like trained
models in the ways that fooled earlier gates (massive activations at the first token and at
delimiters, one erased by a late block; attention sinks; flat next-token distributions; depth),
prompts of 1–641 tokens with and without BOS, every fault of tests/faults.py in an early,
middle and late block, verified whole and streamed.

Used by tests/test_gates.py (assertions) and benchmarks/gate_table.py (docs/verification.md)."""

import contextlib
import dataclasses
import functools
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import equinox as eqx
import numpy as np
import torch
from faults import CODE_FAULTS, WEIGHT_FAULTS, inject_code_fault
from support import tiny_args

import verify.run as run_module
from checkpoint.args import ModelArgs
from checkpoint.tiny import bundled_tokenizer, random_state_dict, write_tiny_checkpoint
from checkpoint.tokenizer import Tokenizer
from checkpoint.trained_like import CALIBRATION_TEXT, trained_like_state_dict
from convert.convert import convert_checkpoint
from verify import runners
from verify.prompts import _LONG, chat_prompt, text_prompt
from verify.results import Report
from verify.run import run_verification


@dataclasses.dataclass(frozen=True)
class Config:
    args: ModelArgs
    build: Callable  # (args, seed=) → fp32 state dict
    faults: tuple[str, ...]  # the faults its table covers
    longest_prompt: int | None = None  # leave longer prompts out (deep configs: time)

    @property
    def faulty_blocks(self) -> tuple[int, ...]:
        """A fault goes into an early, a middle and the last block at once. Teacher forcing
        feeds every block the reference's own input, so each block is judged alone: exactly
        these blocks must fail."""
        n = self.args.n_layers
        return (1, n // 2, n - 1)


ALL_FAULTS = (*WEIGHT_FAULTS, *CODE_FAULTS)
TRAINED_LIKE = tiny_args(dim=128, n_layers=6, head_dim=32, hidden_dim=256, vocab_size=32000)
CONFIGS = {
    # GQA, head_dim ≠ dim / n_heads, a 32-token window shorter than the long prompts.
    "random": Config(
        tiny_args(n_layers=6, vocab_size=32000, sliding_window=32), random_state_dict, ALL_FAULTS
    ),
    # Massive activations at the first token and at delimiters (erased by block 4), sinks.
    "trained-like": Config(TRAINED_LIKE, trained_like_state_dict, ALL_FAULTS),
    # The same, with flat next-token distributions (near-tie top-1 choices).
    "trained-like-flat": Config(
        TRAINED_LIKE,
        functools.partial(trained_like_state_dict, flat=True),
        ("w2-scaled-2pct", "softmax-bf16"),
    ),
    # 64 blocks of tiny width: fp32 rounding accumulates with depth.
    "trained-like-deep": Config(
        tiny_args(dim=64, n_layers=64, head_dim=32, hidden_dim=128, vocab_size=32000),
        trained_like_state_dict,
        ("w2-scaled-2pct", "rmsnorm-in-bf16", "nan-weight"),
        longest_prompt=64,
    ),
}
SEEDS = (0, 1, 2)


def prompts() -> list:
    """1 to 641 tokens; text with and without BOS, a chat, and the short prompt whose
    delimiter (token 2) a late block erases."""
    tokenizer = Tokenizer(bundled_tokenizer(32000))
    return [
        text_prompt("x", tokenizer, bos=False),  # one token, no BOS
        text_prompt("The capital of France is", tokenizer),
        text_prompt(CALIBRATION_TEXT, tokenizer),
        chat_prompt([{"role": "user", "content": "Name three grey cats."}], tokenizer),
        text_prompt(_LONG[:250], tokenizer, bos=False),  # 50 tokens, no BOS
        text_prompt(_LONG, tokenizer),  # 641 tokens
    ]


def prompts_for(config: str, prompt_list: list) -> list:
    longest = CONFIGS[config].longest_prompt
    return [p for p in prompt_list if longest is None or len(p.tokens) <= longest]


def write_source(config: str, seed: int, folder: Path, fault: str | None = None):
    """An official-format bf16 folder of `config`, with a weight fault in its faulty blocks."""
    spec = CONFIGS[config]
    state = {k: v.to(torch.bfloat16) for k, v in spec.build(spec.args, seed=seed).items()}
    for block in spec.faulty_blocks if fault is not None else ():
        WEIGHT_FAULTS[fault](state, spec.args, block)
    write_tiny_checkpoint(folder, spec.args, seed=seed, state=state)
    return folder


@contextlib.contextmanager
def code_fault(fault: str, blocks: tuple[int, ...]):
    """While active, the port's bf16 `blocks` run with the bf16 numerics bug `fault`, in the
    whole model's scan and in streamed groups alike."""
    original_model, original_group = runners.JaxRunner.model, runners.JaxRunner.group

    def model(self, dtype):
        loaded = original_model(self, dtype)
        if dtype != "bfloat16":
            return loaded
        faulty = np.isin(np.arange(self.args.n_layers), blocks)
        return eqx.tree_at(
            lambda m: m.layers, loaded, inject_code_fault(loaded.layers, fault, faulty)
        )

    def group(self, g, dtype):
        loaded = original_group(self, g, dtype)
        if dtype != "bfloat16":
            return loaded
        faulty = np.isin(self.args.layer_groups[g], blocks)
        return loaded._replace(blocks=inject_code_fault(loaded.blocks, fault, faulty))

    runners.JaxRunner.model, runners.JaxRunner.group = model, group
    try:
        yield
    finally:
        runners.JaxRunner.model, runners.JaxRunner.group = original_model, original_group


@dataclasses.dataclass(frozen=True)
class Case:
    config: str
    seed: int
    fault: str | None  # None: clean
    dtype: str = "bfloat16"
    stream: bool = True

    @property
    def id(self) -> str:
        mode = "streamed" if self.stream else "whole"
        return f"{self.config}-seed{self.seed}-{self.fault or 'clean'}-{self.dtype}-{mode}"


class MemoReference(runners.TorchRunner):
    """The torch reference with its results kept across the cases that verify ports of one
    clean folder: the reference's side of every case is the same computation (only the port
    changes), so it runs once. Keyed by folder, method, block, dtype and the input's bytes."""

    results: ClassVar[dict] = {}
    handles: ClassVar[dict] = {}  # id of a loaded group, shell or model → (what, dtype)

    def _memo(self, key, compute):
        key = (str(self.loader.folder), *key)
        if key not in self.results:
            self.results[key] = compute()
        return self.results[key]

    def _loaded(self, what, dtype, value):
        self.handles[id(value)] = (what, dtype)
        return value

    def model(self, dtype):
        return self._memo(
            ("model", dtype),
            lambda: self._loaded("model", dtype, runners.TorchRunner.model(self, dtype)),
        )

    def shell(self, part, dtype, rows=None):
        what = (part, None if rows is None else tuple(rows))  # an embed call's ids index rows
        return self._memo(
            ("shell", *what, dtype),
            lambda: self._loaded(what, dtype, runners.TorchRunner.shell(self, part, dtype, rows)),
        )

    def group(self, g, dtype):
        return self._memo(
            ("group", g, dtype),
            lambda: self._loaded(g, dtype, runners.TorchRunner.group(self, g, dtype)),
        )

    def _call(self, name, handle, *args):
        parts = tuple(_digest(a) for a in args)
        call = getattr(runners.TorchRunner, name)
        return self._memo(
            (name, self.handles[id(handle)], *parts), lambda: call(self, handle, *args)
        )

    def forward_hidden(self, model, tokens, start=0):
        return self._call("forward_hidden", model, tokens, start)

    def embed(self, shell, tokens):
        return self._call("embed", shell, tokens)

    def head(self, shell, h):
        return self._call("head", shell, h)

    def run_group(self, group, h, start=0):
        return self._call("run_group", group, h, start)

    def trace(self, group, k, x, start=0):
        return self._call("trace", group, k, x, start)

    def pieces(self, group, k, values, start=0):
        return self._call("pieces", group, k, values, start)


def _digest(value) -> object:
    """A hashable stand-in for an argument: arrays and dicts of them by their bytes."""
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, hashlib.sha1(value.tobytes()).hexdigest())
    if isinstance(value, dict):
        return tuple((k, _digest(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(_digest(v) for v in value)
    return value


@contextlib.contextmanager
def memo_reference():
    """While active, verify runs the reference through `MemoReference` (generation too)."""
    original = (run_module.TorchRunner, run_module.reference_continuations)
    continuations = {}

    def reference_continuations(model, prompts, max_new_tokens):
        key = (id(model), _digest(prompts), max_new_tokens)
        if key not in continuations:
            continuations[key] = original[1](model, prompts, max_new_tokens)
        return continuations[key]

    run_module.TorchRunner, run_module.reference_continuations = (
        MemoReference,
        reference_continuations,
    )
    try:
        yield
    finally:
        run_module.TorchRunner, run_module.reference_continuations = original


def run_case(case: Case, clean_source: Path, work: Path, prompt_list: list, **options) -> Report:
    """Verify the port of `clean_source` with `case`'s fault against the clean reference (the
    reference's results kept across cases: `memo_reference`)."""
    source = clean_source
    if case.fault in WEIGHT_FAULTS:
        source = write_source(case.config, case.seed, work / "faulty", case.fault)
    converted = work / "converted"
    shutil.rmtree(converted, ignore_errors=True)
    convert_checkpoint(source, converted)
    shutil.rmtree(work / "faulty", ignore_errors=True)
    injected = None
    if case.fault in CODE_FAULTS:
        injected = code_fault(case.fault, CONFIGS[case.config].faulty_blocks)
    with injected or contextlib.nullcontext(), memo_reference():
        return run_verification(
            clean_source,
            converted,
            dtype=case.dtype,
            prompts=prompts_for(case.config, prompt_list),
            stream_layers=case.stream,
            max_new_tokens=8,
            **options,
        )


def cases() -> list[Case]:
    """Clean runs for every seed, whole and streamed; every fault of each config (seed 0),
    whole and streamed; fp32 clean and weight faults."""
    out = []
    for stream in (True, False):
        out += [Case(c, s, None, stream=stream) for c in CONFIGS for s in SEEDS]
        out += [Case(c, 0, f, stream=stream) for c, spec in CONFIGS.items() for f in spec.faults]
        out += [Case(c, 0, None, "float32", stream) for c in CONFIGS]
        out += [Case("random", 0, f, "float32", stream) for f in WEIGHT_FAULTS]
    return out
