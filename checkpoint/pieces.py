"""A block's forward as an ordered list of named pieces — the one declaration both models use
to run a block and verify uses to judge it (`docs/verification.md`).

A `Piece` reads named values (the block's input `x`, earlier pieces' outputs, or context the
caller supplies: `rope`, `positions`, `cached`) and writes named outputs. `run_pieces` runs a
block's pieces in order, so the forward *is* the declaration: what verify judges piece by
piece is what the forward computes. A piece may be a module or a plain function, take several
inputs and give several outputs (integers too: a router's chosen experts). An integer output
`X` chosen as the top-k of a float output `X_scores` of the same piece is compared tie-aware
(verify/metrics.py `MismatchSums`). Framework-free: the torch reference and the JAX port each
build their own list from their own modules.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

BLOCK_INPUT = "x"
BLOCK_OUTPUT = "out"
# Values a caller supplies to a block besides its input: each framework builds its own from
# the positions, so verify never compares them.
CONTEXT = ("rope", "positions", "cached")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One step of a block's forward: `outputs = run(*inputs)` on named values."""

    name: str
    run: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    judged: bool = True  # False for glue (residual additions) that verify does not score

    def __call__(self, values: Mapping[str, object]) -> dict[str, object]:
        """This piece's outputs, by name, computed from `values`."""
        result = self.run(*(values[name] for name in self.inputs))
        if len(self.outputs) == 1:
            result = (result,)
        return dict(zip(self.outputs, result, strict=True))


def run_pieces(pieces: Sequence[Piece], values: Mapping[str, object]) -> dict[str, object]:
    """Run `pieces` in order from `values`; every value seen and computed, by name."""
    values = dict(values)
    for piece in pieces:
        values.update(piece(values))
    return values


def check_pieces(pieces: Sequence[Piece]) -> None:
    """ValueError unless every input is the block input, context or an earlier output, every
    name is written once, and the last piece writes the block output."""
    known = {BLOCK_INPUT, *CONTEXT}
    names = set()
    for piece in pieces:
        if piece.name in names:
            raise ValueError(f"piece {piece.name!r} is declared twice")
        names.add(piece.name)
        missing = [name for name in piece.inputs if name not in known]
        if missing:
            raise ValueError(f"piece {piece.name!r} reads {missing} before anything writes it")
        again = [name for name in piece.outputs if name in known]
        if again:
            raise ValueError(f"piece {piece.name!r} writes {again} a second time")
        known.update(piece.outputs)
    if not pieces or BLOCK_OUTPUT not in pieces[-1].outputs:
        raise ValueError(f"the last piece must write {BLOCK_OUTPUT!r}")


def recorded(values: Mapping[str, object]) -> dict[str, object]:
    """The values a block run computed (and its input), without the caller's context."""
    return {name: value for name, value in values.items() if name not in CONTEXT}
