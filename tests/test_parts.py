"""The model owns its parts: verify judges exactly the blocks the shipped forward runs.

Faults placed in the forward's own machinery — the scan's block construction (window ignored),
the scan's indexing of the stacked weights, a declared piece — fail verify in whole-model and
in streamed mode, naming the block and the piece; a piece added to a block's declaration
appears in the report with no change in verify; the pieces each block declares run exactly
the forward; the JAX model runs where torch cannot be imported."""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import tiny_args

import model_jax.model as jax_model
import reference_torch.model as torch_model
from checkpoint.args import MoeArgs
from checkpoint.pieces import Piece, check_pieces, run_pieces
from convert.convert import convert_checkpoint
from model_jax.loading import PortLoader, load_model
from verify.report import markdown
from verify.run import run_verification

# A window pattern of period 2 (windowed, full) shorter than the long prompt: each scan step
# runs two blocks, so indexing inside the group matters.
ARGS = tiny_args(vocab_size=32000, n_layers=4, sliding_window=[6, None])
PROMPTS = [
    "The capital of France is",
    "A window of six tokens is much shorter than this prompt, which wraps it several times.",
]
MODES = [pytest.param(True, id="streamed"), pytest.param(False, id="whole")]


@pytest.fixture(scope="module")
def folders(make_checkpoint, tmp_path_factory):
    source = make_checkpoint(ARGS, seed=5)
    out = tmp_path_factory.mktemp("parts") / "converted"
    convert_checkpoint(source, out)
    return source, out


def verify(folders, stream: bool, dtype="bfloat16"):
    source, out = folders
    return run_verification(
        source, out, prompts=PROMPTS, dtype=dtype, stream_layers=stream, max_new_tokens=4
    )


def failing_pieces(report, block: int) -> set[str]:
    layer = report.layers[block]
    return {f.split(":")[0] for f in layer.failures}


@pytest.mark.slow
@pytest.mark.parametrize("stream", MODES)
def test_the_scans_block_construction_ignoring_windows_fails(folders, patched, stream):
    original = jax_model.group_block
    patched(jax_model, "group_block", lambda group, k, window: original(group, k, None))
    report = verify(folders, stream)
    windowed = [i for i, w in enumerate(ARGS.layer_windows) if w is not None]
    assert report.verdict == "fail" and list(report.failing_blocks) == windowed, report.reasons
    for i in windowed:
        assert "attention" in failing_pieces(report, i)
        assert any(r.startswith(f"block {i}: attention:") for r in report.reasons)


@pytest.mark.slow
@pytest.mark.parametrize("stream", MODES)
def test_the_scans_indexing_of_the_stacked_weights_fails(folders, patched, stream):
    original = jax_model.group_block
    patched(jax_model, "group_block", lambda group, k, window: original(group, 0, window))
    report = verify(folders, stream)
    second = [i for i in range(ARGS.n_layers) if i % 2 == 1]  # each group's second block
    assert report.verdict == "fail" and list(report.failing_blocks) == second, report.reasons
    for i in second:
        assert {"attention_norm", "qkv", "attention", "feed_forward"} <= failing_pieces(report, i)


@pytest.mark.slow
@pytest.mark.parametrize("stream", MODES)
def test_a_fault_in_one_declared_piece_fails_that_piece_in_every_block(folders, patched, stream):
    attend = jax_model.Attention.attend
    patched(jax_model.Attention, "attend", lambda self, *a, **k: attend(self, *a, **k) * 1.01)
    report = verify(folders, stream)
    assert report.verdict == "fail" and list(report.failing_blocks) == [0, 1, 2, 3]
    for i in range(ARGS.n_layers):
        assert failing_pieces(report, i) == {"attention", "block"}, report.layers[i].failures


@pytest.mark.slow
@pytest.mark.parametrize("stream", MODES)
def test_a_piece_added_to_the_declaration_is_judged_and_reported(folders, patched, stream):
    def with_extra(original, add):
        def pieces(self):
            declared = original(self)
            extra = Piece("ffn_norm_twice", self.ffn_norm, ("h_normed",), ("h_twice",))
            return (*declared[:-1], extra, declared[-1]) if add else declared

        return pieces

    patched(
        torch_model.TransformerBlock,
        "pieces",
        with_extra(torch_model.TransformerBlock.pieces, True),
    )
    patched(
        jax_model.TransformerBlock, "pieces", with_extra(jax_model.TransformerBlock.pieces, True)
    )
    report = verify(folders, stream)
    assert report.verdict == "pass", report.reasons
    for layer in report.layers:
        names = [p.piece for p in layer.pieces]
        assert names[-2:] == ["ffn_norm_twice", "block"] and "feed_forward" in names
    assert "ffn_norm_twice" in markdown(report)


def test_the_declared_pieces_are_the_forward_in_both_models():
    for args in (ARGS, tiny_args(moe=MoeArgs(num_experts=3, num_experts_per_tok=2))):
        torch.manual_seed(0)
        block = torch_model.make_block(args, 0)
        check_pieces(block.pieces())
        skeleton = eqx.filter_eval_shape(jax_model.Transformer.zeros, args, jnp.float32)
        jax_pieces = eqx.filter_eval_shape(skeleton.block, 0).pieces()
        check_pieces(jax_pieces)
        assert [(p.name, p.inputs, p.outputs, p.judged) for p in block.pieces()] == [
            (p.name, p.inputs, p.outputs, p.judged) for p in jax_pieces
        ]


def test_run_pieces_reads_and_writes_named_values_and_allows_integer_outputs():
    pieces = [
        Piece("top", lambda x: (np.max(x, -1), np.argmax(x, -1)), ("x",), ("best", "index")),
        Piece("pick", lambda x, i: x[np.arange(len(x)), i], ("x", "index"), ("out",)),
    ]
    check_pieces(pieces)
    values = run_pieces(pieces, {"x": np.array([[1.0, 3.0], [4.0, 2.0]])})
    assert values["index"].tolist() == [1, 0] and values["out"].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="reads \\['y'\\] before"):
        check_pieces([Piece("p", abs, ("y",), ("out",))])
    with pytest.raises(ValueError, match="must write 'out'"):
        check_pieces([Piece("p", abs, ("x",), ("z",))])


@pytest.mark.slow
def test_whole_model_block_i_is_the_streamed_group_block(folders):
    _, out = folders
    model = load_model(out, dtype="float32")
    loader = PortLoader(out)
    for i in range(ARGS.n_layers):
        period = len(ARGS.window_pattern)
        streamed = jax_model.group_block(
            loader.group(i // period, dtype="float32"), i % period, ARGS.layer_windows[i]
        )
        whole = model.block(i)
        assert whole.attention.sliding_window == streamed.attention.sliding_window
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), whole, streamed))


@pytest.mark.slow
def test_the_jax_model_and_mistral_generate_run_without_torch(folders):
    _, out = folders
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not available here")

        sys.meta_path.insert(0, NoTorch())
        import jax.numpy as jnp
        import model_jax
        model = model_jax.load_model({str(out)!r}, dtype="float32")
        assert model(jnp.array([1, 415, 5565])).shape == (3, {ARGS.vocab_size})
        assert len(model_jax.generate(model, [[1, 415]], max_new_tokens=3)[0]) == 3
        from model_jax.cli import main
        main([{str(out)!r}, "--prompt", "Hello", "--max-new-tokens", "2"], standalone_mode=False)
        assert "torch" not in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
