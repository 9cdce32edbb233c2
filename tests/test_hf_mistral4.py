"""The HF export of latent attention + fine-grained experts (`--format hf` →
transformers' `Mistral4ForCausalLM`): the stacked expert tensors, the config transformers
loads with our fp32 logits (this toolkit's reading of YaRN's softmax scale, with and without
`apply_scale`), and what is refused by name."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from mla_support import LARGE3, ORIGINAL
from safetensors.torch import load_file
from support import relative_error

import reference_torch
from checkpoint.errors import CheckpointError
from checkpoint.hf import hf_config
from checkpoint.hf_mistral4 import stacked_experts
from checkpoint.tiny import random_state_dict, write_tiny_checkpoint
from convert.convert import convert_checkpoint

transformers = pytest.importorskip("transformers")

APPLY_SCALE = dataclasses.replace(LARGE3, yarn=dataclasses.replace(LARGE3.yarn, apply_scale=True))
# Without YaRN or Llama-4 scaling: plain RoPE over the rope dimensions only.
PLAIN_ROPE = dataclasses.replace(LARGE3, yarn=None, llama_4_scaling=None)
CONFIGS = {"large3": LARGE3, "large3-apply-scale": APPLY_SCALE, "plain-rope": PLAIN_ROPE}


def test_a_stacked_tensor_is_its_parts_back_to_back():
    """Two experts of width 2 over dim 3: the bytes of w1₀ w3₀ w1₁ w3₁ in a row are
    transformers' gate_up_proj (each expert's w1 rows, then its w3 rows), w2₀ w2₁ its
    down_proj."""
    args = dataclasses.replace(
        LARGE3,
        dim=3,
        n_layers=2,
        moe=dataclasses.replace(
            LARGE3.moe,
            num_experts=2,
            num_experts_per_tok=1,
            expert_hidden_dim=2,
            num_expert_groups=1,
        ),
    )
    stacked = stacked_experts(args)
    assert list(stacked) == [
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]
    tensors = {
        f"layers.1.experts.{e}.{w}.weight": torch.randn((3, 2) if w == "w2" else (2, 3))
        for e in range(2)
        for w in ("w1", "w2", "w3")
    }
    ours = {
        name: torch.cat([tensors[part].flatten() for part in parts]).view(shape)
        for name, (shape, parts) in stacked.items()
    }
    w = "layers.1.experts.{}.{}.weight".format
    gate_up = torch.stack([torch.cat([tensors[w(e, "w1")], tensors[w(e, "w3")]]) for e in (0, 1)])
    down = torch.stack([tensors[w(e, "w2")] for e in (0, 1)])
    assert torch.equal(ours["model.layers.1.mlp.experts.gate_up_proj"], gate_up)
    assert torch.equal(ours["model.layers.1.mlp.experts.down_proj"], down)


@pytest.fixture(params=CONFIGS, scope="module")
def exported(request, tmp_path_factory):
    args = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    state = random_state_dict(args, seed=3)
    write_tiny_checkpoint(root / "src", args, state=state, weights_format="safetensors")
    convert_checkpoint(root / "src", root / "hf", layout="hf", max_shard_size="1MB")
    return args, root / "src", root / "hf"


def test_the_export_holds_every_tensor_under_its_hf_name(exported):
    args, source, hf = exported
    state = load_file(source / "consolidated.safetensors")
    written = {}
    for shard in sorted(hf.glob("model-*.safetensors")):
        written |= load_file(shard)
    routed_layers = args.n_layers - args.dense_layers  # 3 tensors per expert → 2 stacked
    assert len(written) == len(state) - routed_layers * (3 * args.moe.num_experts - 2)
    assert torch.equal(
        written["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"],
        state["layers.1.attention.wkv_a_with_mqa.weight"],  # no rotary permutation
    )
    gate_up = written["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(
        gate_up[5, : args.moe.expert_hidden_dim], state["layers.2.experts.5.w1.weight"]
    )
    assert torch.equal(
        gate_up[5, args.moe.expert_hidden_dim :], state["layers.2.experts.5.w3.weight"]
    )
    down = written["model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(down[7], state["layers.2.experts.7.w2.weight"])


@pytest.mark.slow
def test_transformers_mistral4_loads_the_export_with_our_logits(exported):
    """Dense-first layers, two expert groups, routed_scale 2.5, YaRN, Llama-4 scaling, past
    the original context; fp32."""
    _, source, hf = exported
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "mistral4" and config["rope_interleave"] is True
    model = transformers.Mistral4ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.tensor([np.random.default_rng(4).integers(0, 5000, 3 * ORIGINAL).tolist()])
    with torch.no_grad():
        theirs = model(tokens).logits[0].numpy()
        ours = reference_torch.Transformer.from_folder(source, dtype="float32")(tokens)[0]
    assert relative_error(theirs, ours.numpy()) <= 1e-5


def test_the_export_is_not_read_back_and_says_so(exported, tmp_path):
    *_, hf = exported
    with pytest.raises(CheckpointError, match=r"model_type 'mistral4' .* is not read back"):
        convert_checkpoint(hf, tmp_path / "back")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"moe": dataclasses.replace(LARGE3.moe, num_shared_experts=0)}, "always has shared"),
        ({"norm_eps": 1e-5}, "eps 1e-06"),
        (
            {"llama_4_scaling": dataclasses.replace(LARGE3.llama_4_scaling, beta=0.1)}
            | {"yarn": dataclasses.replace(LARGE3.yarn, original_max_position_embeddings=16)},
            "Llama-4 scaling length",
        ),
    ],
    ids=["no-shared-expert", "norm-eps", "two-original-lengths"],
)
def test_what_mistral4_cannot_express_is_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        hf_config(dataclasses.replace(LARGE3, **change), "bfloat16")
