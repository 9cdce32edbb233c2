"""The one key → shape spec of an official checkpoint, derived from `ModelArgs`.

Key names and `(out, in)` shapes as in mistral-inference `transformer.py` / `moe.py`; the
converter, both models and the verifier all check against this table.
"""

from checkpoint.args import ModelArgs

Shape = tuple[int, ...]


def layer_spec(args: ModelArgs) -> dict[str, Shape]:
    """Shapes of one block's tensors, keyed by the name after `layers.N.`."""
    q_out = args.n_heads * args.head_dim
    kv_out = args.n_kv_heads * args.head_dim
    spec: dict[str, Shape] = {
        "attention.wq.weight": (q_out, args.dim),
        "attention.wk.weight": (kv_out, args.dim),
        "attention.wv.weight": (kv_out, args.dim),
        "attention.wo.weight": (args.dim, q_out),
    }
    if args.moe is None:
        spec |= {
            "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            "feed_forward.w3.weight": (args.hidden_dim, args.dim),
        }
    else:
        spec["feed_forward.gate.weight"] = (args.moe.num_experts, args.dim)
        for e in range(args.moe.num_experts):
            spec |= {
                f"feed_forward.experts.{e}.w1.weight": (args.hidden_dim, args.dim),
                f"feed_forward.experts.{e}.w2.weight": (args.dim, args.hidden_dim),
                f"feed_forward.experts.{e}.w3.weight": (args.hidden_dim, args.dim),
            }
    spec |= {"attention_norm.weight": (args.dim,), "ffn_norm.weight": (args.dim,)}
    return spec


def tensor_spec(args: ModelArgs) -> dict[str, Shape]:
    """Every tensor of the checkpoint in model order: embeddings, blocks, final norm, head."""
    spec: dict[str, Shape] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    per_layer = layer_spec(args)
    for i in range(args.n_layers):
        spec |= {f"layers.{i}.{name}": shape for name, shape in per_layer.items()}
    spec["norm.weight"] = (args.dim,)
    spec["output.weight"] = (args.vocab_size, args.dim)
    return spec


def check_against_spec(found: dict[str, Shape], args: ModelArgs) -> list[str]:
    """Problems (missing, unexpected, wrongly shaped tensors) as readable one-liners."""
    expected = tensor_spec(args)
    problems = [
        f"missing tensor {k} (expected shape {list(s)})"
        for k, s in expected.items()
        if k not in found
    ]
    problems += [f"unexpected tensor {k}" for k in found if k not in expected]
    problems += [
        f"tensor {k} has shape {list(found[k])}, expected {list(s)}"
        for k, s in expected.items()
        if k in found and tuple(found[k]) != s
    ]
    return problems
