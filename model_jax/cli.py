"""`mistral-generate FOLDER --prompt TEXT ...`: generate with the JAX model, printing text as
it is produced."""

import json
import sys

import click
import jax

from checkpoint.cli_errors import (
    OneLineErrors,
    dtype_option,
    json_option,
    max_new_tokens_option,
    mesh_option,
    refuse_without,
)
from checkpoint.dtypes import DTYPE_NAMES
from checkpoint.errors import CheckpointError
from checkpoint.tokenizer import Tokenizer
from model_jax.generate import check_positions, generate
from model_jax.loading import load_model
from model_jax.sharding import make_mesh


class TextStreamer:
    """Prints the new text of a single sequence after each generation step."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, step: int, tokens: list[int | None]) -> None:
        if tokens[0] is None:
            return
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids)  # whole text: pieces merge across tokens
        click.echo(text[len(self.printed) :], nl=False)
        self.printed = text


@click.command(cls=OneLineErrors)
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Repeat for more.")
@max_new_tokens_option()
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(1),
    default=32768,
    show_default=True,
    help="Refuse longer prompts (the cache grows with them).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 100),
    default=0.0,
    show_default=True,
    help="0: greedy (then --top-p, --top-k and --seed do not apply).",
)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0: off.")
@click.option("--seed", default=0, show_default=True)
@dtype_option(DTYPE_NAMES, "bfloat16")
@mesh_option()
@click.option(
    "--chat",
    is_flag=True,
    help="Each prompt is a user message, rendered with the folder's instruct tokenizer.",
)
@json_option(
    "Print one JSON object on stdout when done (each prompt's text, ids and completion) "
    "instead of streaming the text."
)
@click.pass_context
def main(
    ctx,
    folder,
    prompts,
    max_new_tokens,
    max_prompt_tokens,
    temperature,
    top_p,
    top_k,
    seed,
    dtype,
    mesh,
    chat,
    as_json,
) -> None:
    """Continue each PROMPT with the model in FOLDER (official or converted)."""
    if temperature == 0:
        refuse_without(
            ctx,
            ["top_p", "top_k", "seed"],
            needed="--temperature above 0",
            reason="greedy decoding would ignore it",
        )
    try:
        tokenizer = Tokenizer.from_folder(folder)
        model = load_model(folder, dtype=dtype, mesh=make_mesh(mesh) if mesh else None)
        tokenizer.check_vocab(model.args.vocab_size, f"{folder}/params.json")
        encoded = [
            tokenizer.encode_chat([{"role": "user", "content": p}]) if chat else tokenizer.encode(p)
            for p in prompts
        ]
        for i, ids in enumerate(encoded):
            if len(ids) > max_prompt_tokens:
                raise ValueError(
                    f"prompt {i + 1} has {len(ids)} tokens, more than --max-prompt-tokens "
                    f"{max_prompt_tokens}"
                )
            try:
                check_positions(model.args, len(ids), max_new_tokens)
            except ValueError as err:
                raise ValueError(f"prompt {i + 1}: {err} ({folder}/params.json)") from None
    except (CheckpointError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    key = jax.random.key(seed)
    results = []
    for i, text in enumerate(prompts):
        if not as_json:
            click.echo(f"--- prompt {i + 1}")
            click.echo(text, nl=False)
        new_ids = generate(
            model,
            [encoded[i]],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            key=jax.random.fold_in(key, i),
            eos_id=tokenizer.eos_id,
            on_step=None if as_json else TextStreamer(tokenizer),
        )[0]
        if as_json:
            results.append(
                {
                    "prompt": text,
                    "prompt_ids": list(encoded[i]),
                    "new_ids": [int(t) for t in new_ids],
                    "completion": tokenizer.decode(new_ids),
                }
            )
        else:
            click.echo()
    if as_json:
        click.echo(json.dumps({"folder": folder, "dtype": dtype, "results": results}))
