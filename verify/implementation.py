"""What verify needs of an implementation of a Mistral model: the seam between the judge and
the things it judges (`docs/verification.md`, "Judging another port").

Two protocols. `WholeForward` is the least: load the model, run its own forward and return
every hidden state and the logits (the HF peer offers only this, and the report says so).
`Implementation` adds the pieces the forward is made of — embeddings, each scan step's group of
blocks exactly as the forward runs them, each block's declared pieces (`checkpoint.pieces`),
the head — so verify can hold one group at a time and judge every piece on the reference's
own input. The torch reference (`verify.runners.TorchRunner`) and the JAX port
(`verify.runners.JaxRunner`) implement it; another port (a Flax model, MaxText) would too.

Arrays cross the seam as numpy, without a batch axis, the sequence first: floats as float32
(exact for bf16 values), integers as they are. An implementation may also offer `judge`
(`judge` below): a prompt's pieces and free run computed together.
"""

from typing import Any, Protocol

import numpy as np

from checkpoint.args import ModelArgs

Values = dict[str, np.ndarray]  # named values of one block run (`checkpoint.pieces`)
PieceOutputs = dict[str, Values]  # piece name → its outputs by name; "block": {"out": …}
WHOLE_BLOCK = "block"  # the pseudo-piece: the block's whole forward on its input


class WholeForward(Protocol):
    """An implementation verify can only run whole (a peer)."""

    args: ModelArgs

    def model(self, dtype: str) -> Any:
        """The whole model in `dtype` ("bfloat16" or "float32")."""

    def forward_hidden(
        self, model: Any, tokens: list[int], start: int = 0
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Its own forward on one prompt at positions start, start+1, …: the hidden states
        (embeddings, after each block, after the final norm) and the fp32 logits."""


class Implementation(WholeForward, Protocol):
    """An implementation verify can judge group by group and piece by piece."""

    vocab_rows: int | None  # None: whole vocabulary tables; else read in parts (`verify.vocab`)

    def shell(self, part: str, dtype: str, rows: list[int] | None = None) -> Any:
        """The model without its blocks, holding what `part` needs: "embed" (for `embed`) or
        "head" (for `head`), as `checkpoint.spec.shell_modules` lists; with `rows`
        (ascending), its vocabulary table (`checkpoint.spec.vocab_table`) holds only those
        rows, in that order."""

    def embed(self, shell: Any, tokens: list[int]) -> np.ndarray:
        """(T, dim) embeddings (an "embed" shell; one holding some rows takes each token as
        the position of its row among them)."""

    def head(self, shell: Any, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The final norm of h and the fp32 logits (a "head" shell)."""

    def group(self, g: int, dtype: str) -> Any:
        """The blocks of the forward's step g (`ModelArgs.layer_groups`), built as the forward
        builds them."""

    def run_group(self, group: Any, h: np.ndarray, start: int = 0) -> list[np.ndarray]:
        """The group's blocks in order on h (its first token at position `start`), as the
        forward runs them: each one's output."""

    def trace(self, group: Any, k: int, x: np.ndarray, start: int = 0) -> Values:
        """Block k of the group on x: every value its forward computed, by name."""

    def pieces(self, group: Any, k: int, values: Values, start: int = 0) -> PieceOutputs:
        """Each judged piece of block k run on its inputs taken from `values` (teacher
        forcing), and the whole block on values["x"] (`WHOLE_BLOCK`)."""


def judge(
    impl: Implementation, group: Any, values: list[Values], h: np.ndarray | None, start: int = 0
) -> tuple[list[PieceOutputs], list[np.ndarray] | None]:
    """One prompt's teacher-forced pieces of every block k of the group (`pieces` on
    `values[k]`) and, unless `h` is None, the group's free run on h (`run_group`). An
    implementation that computes them together (the port: in one compiled call) offers its own
    `judge(group, values, h, start)`; the others are called piece by piece."""
    own = getattr(impl, "judge", None)
    return own(group, values, h, start) if own else judge_apart(impl, group, values, h, start)


def judge_apart(
    impl: Implementation, group: Any, values: list[Values], h: np.ndarray | None, start: int = 0
) -> tuple[list[PieceOutputs], list[np.ndarray] | None]:
    """`judge` as its parts: `pieces` of each block, then `run_group`."""
    pieces = [impl.pieces(group, k, v, start) for k, v in enumerate(values)]
    return pieces, None if h is None else impl.run_group(group, h, start)
