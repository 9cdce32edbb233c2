"""Tokenizers through mistral-common: the one file of a folder is found as the official loader
finds it, every real Mistral tokenizer round-trips text and renders chats, and a tokenizer whose
vocabulary differs from params.json is refused by convert, verify and generate."""

import importlib.resources
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import tiny_args

from checkpoint.errors import CheckpointError
from checkpoint.tiny import write_tiny_checkpoint
from checkpoint.tokenizer import Tokenizer, find_tokenizer
from convert.convert import convert_checkpoint
from model_jax.cli import main as generate_cli

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
REAL = {  # file in mistral-common → (vocabulary, the name its release folder gives it)
    "tokenizer.model.v1": (32000, "tokenizer.model"),
    "mistral_instruct_tokenizer_240216.model.v2": (32768, "tokenizer.model.v2"),
    "mistral_instruct_tokenizer_240323.model.v3": (32768, "tokenizer.model.v3"),
    "mistral_instruct_tokenizer_241114.model.v7": (32768, "tokenizer.model.v7"),
    "tekken_240718.json": (131072, "tekken.json"),
    "tekken_240911.json": (131072, "tekken.json"),
}
TEXT = "Hello, world! Ünïcödé, 数字 3.14159 and code: for i in range(10): print(i * i)"


@pytest.mark.slow
@pytest.mark.parametrize("file", REAL)
def test_every_real_tokenizer_round_trips_and_renders_chats(tmp_path, file):
    vocab, name = REAL[file]
    shutil.copyfile(DATA / file, tmp_path / name)
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.path.name == name and tokenizer.vocab_size == vocab
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    ids = tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_id and tokenizer.encode(TEXT, bos=False) == ids[1:]
    assert tokenizer.decode(ids[1:]).strip() == TEXT
    chat = tokenizer.encode_chat(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert chat[0] == tokenizer.bos_id and tokenizer.eos_id in chat  # the turn it closed
    assert chat[-1] != tokenizer.eos_id  # ready for the assistant's next turn


def test_zero_or_several_tokenizer_files_are_refused_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match="found none"):
        find_tokenizer(tmp_path)
    shutil.copyfile(DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    shutil.copyfile(DATA / "tekken_240718.json", tmp_path / "tekken.json")
    with pytest.raises(CheckpointError, match=r"found tekken\.json, tokenizer\.model"):
        find_tokenizer(tmp_path)


def test_a_file_named_like_a_tokenizer_but_broken_is_refused(tmp_path):
    (tmp_path / "tokenizer.model.v3").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model\.v3: not a Mistral tokenizer"):
        Tokenizer.from_folder(tmp_path)


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """A folder whose params.json says 32000 but whose tokenizer has 131072 tokens."""
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("mismatch") / "src", tiny_args(vocab_size=32000), tokenizer=False
    )
    shutil.copyfile(DATA / "tekken_240718.json", folder / "tekken.json")
    return folder


def test_convert_refuses_a_tokenizer_that_does_not_match_params(mismatched, tmp_path):
    with pytest.raises(CheckpointError, match=r"vocabulary has 131072 tokens but .* 32000"):
        convert_checkpoint(mismatched, tmp_path / "out")


def test_generate_refuses_a_tokenizer_that_does_not_match_params(mismatched):
    result = CliRunner().invoke(generate_cli, [str(mismatched), "--prompt", "Hi"])
    assert result.exit_code == 2
    assert "vocabulary has 131072 tokens but" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_generate_renders_chat_prompts(make_checkpoint):
    folder = make_checkpoint(tiny_args(vocab_size=32768), weights_format="safetensors")
    result = CliRunner().invoke(
        generate_cli, [str(folder), "--prompt", "Hi", "--chat", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("--- prompt 1\nHi")


def test_a_prompt_past_the_limit_is_refused_naming_it(make_checkpoint):
    folder = make_checkpoint(tiny_args(vocab_size=32000))
    result = CliRunner().invoke(generate_cli, [str(folder), "--prompt", "word " * 40_000])
    assert result.exit_code == 2
    assert "more than --max-prompt-tokens 32768" in result.stderr
