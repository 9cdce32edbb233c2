"""Streaming within a layer (`--stream-layers` on fine-grained MoE): each model holds a block
without its routed experts and reads them as they run — the reference one expert at a time,
the port a few at a time — with the results of the block holding them all, reading only the
experts some token chose."""

import numpy as np
import pytest
from mla_support import LARGE3

from checkpoint.tiny import random_state_dict, write_tiny_checkpoint
from convert.convert import convert_checkpoint
from model_jax.loading import PortLoader
from reference_torch.loading import ReferenceLoader
from verify.runners import JaxRunner, TorchRunner

ROUTED_GROUP = (
    1  # LARGE3: layer 0 dense, layers 1 and 2 routed, one per scan step: step 1 is layer 1
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("large3")
    state = random_state_dict(LARGE3, seed=5)
    write_tiny_checkpoint(root / "src", LARGE3, state=state, weights_format="safetensors")
    convert_checkpoint(root / "src", root / "out")
    return root


def _inputs(n: int = 11) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, LARGE3.dim)).astype(np.float32)


def _outputs(runner, dtype: str) -> list[dict]:
    """The group's outputs, block 0's recorded values, and its pieces on them."""
    group = runner.group(ROUTED_GROUP, dtype)
    x = _inputs()
    values = runner.trace(group, 0, x)
    pieces = runner.pieces(group, 0, values)
    flat = {f"{p}/{o}": v for p, outputs in pieces.items() for o, v in outputs.items()}
    return [{"run": runner.run_group(group, x)[0]}, values, flat]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_reference_streamed_computes_exactly_what_it_computes_holding_them(folder, dtype):
    held = _outputs(TorchRunner(folder / "src", "cpu"), dtype)
    streamed = _outputs(TorchRunner(folder / "src", "cpu", streamed=True), dtype)
    for a, b in zip(held, streamed, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_port_streamed_adds_the_same_terms_in_the_same_order(folder, dtype):
    """Each part of the experts adds its tokens' outputs to the last part's sum, in expert
    order: the held block's sums, term for term (the grouped matmul sees fewer rows, which
    XLA may block differently: within one rounding of the dtype)."""
    held = _outputs(JaxRunner(folder / "out"), dtype)
    streamed = _outputs(JaxRunner(folder / "out", streamed=True), dtype)
    ulp = float(np.finfo(np.float32).eps) if dtype == "float32" else 2.0**-8
    for a, b in zip(held, streamed, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            if a[name].dtype.kind in "iu":  # chosen experts
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
                continue
            scale = max(float(np.abs(a[name]).max()), 1e-30)
            assert float(np.abs(a[name] - b[name]).max()) <= ulp * scale, name


def test_streamed_blocks_hold_no_routed_expert_and_read_only_the_chosen_ones(folder, monkeypatch):
    port = JaxRunner(folder / "out", streamed=True)
    ref = TorchRunner(folder / "src", "cpu", streamed=True)
    port_group, ref_group = port.group(ROUTED_GROUP, "float32"), ref.group(ROUTED_GROUP, "float32")
    assert port_group.blocks.experts is None and port_group.layers == (1,)
    names = [n for n, _ in ref_group.blocks[0].named_parameters()]
    assert names and not any(n.startswith("experts.") for n in names)

    port_reads, ref_reads = [], []
    port_experts, ref_expert = PortLoader.experts, ReferenceLoader.expert

    def count_port(self, layer, first, count, **kwargs):
        port_reads.append(range(first, first + count))
        return port_experts(self, layer, first, count, **kwargs)

    def count_ref(self, prefix, **kwargs):
        ref_reads.append(int(prefix.split(".")[-2]))
        return ref_expert(self, prefix, **kwargs)

    monkeypatch.setattr(PortLoader, "experts", count_port)
    monkeypatch.setattr(ReferenceLoader, "expert", count_ref)
    x = _inputs(3)  # 3 tokens × 2 experts: at most 6 of the 8 chosen
    chosen = set(ref.trace(ref_group, 0, x)["experts"].ravel().tolist())
    assert sorted(ref_reads) == sorted(chosen)  # each chosen expert once, no other
    port.trace(port_group, 0, x)
    read = [e for part in port_reads for e in part]
    assert len(read) == len(set(read)) and chosen <= set(read)
    assert all(chosen & set(part) for part in port_reads)  # no part that no token chose
