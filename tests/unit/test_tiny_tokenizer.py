"""The tiny Llama's tokenizer: made without downloads, loadable like any checkpoint's, lossless on text."""

from __future__ import annotations

import pytest

from swarm.models.tiny import TINY_SPECIAL_TOKENS, tiny_llama_config, write_tiny_llama, write_tiny_tokenizer
from swarm.models.tokenizer import load_tokenizer

ASCII_TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n and a dot . and a comma , too",
    "".join(chr(c) for c in range(128)),  # every ASCII character, control ones included
    "",
]
UNICODE_TEXTS = ["héllo wörld", "snowman ☃ and 日本語", "emoji 🙂 four bytes"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A folder holding both the tiny model and its tokenizer, as a node or trainer would be given."""
    path = write_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny-tok", num_blocks=2)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    return load_tokenizer(tiny_folder)


@pytest.mark.parametrize("text", ASCII_TEXTS + UNICODE_TEXTS)
def test_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte


def test_special_tokens_match_the_tiny_llama_config(tokenizer, tiny_folder):
    config = tiny_llama_config()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.pad_token_id,
        config.bos_token_id,
        config.eos_token_id,
    )
    assert tokenizer.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS)) == [0, 1, 2, 3]
    ids = tokenizer("<s>hi</s>", add_special_tokens=False)["input_ids"]
    assert ids[0] == config.bos_token_id and ids[-1] == config.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    # padding uses id 0 so batches can be fed to the model as is
    batch = tokenizer(["a", "abc"], padding=True)["input_ids"]
    assert batch[0] == [tokenizer.convert_tokens_to_ids("a"), 0, 0]


def test_every_id_is_below_vocab_size_and_the_model_folder_is_untouched(tokenizer, tiny_folder):
    from transformers import AutoConfig, AutoTokenizer

    assert max(tokenizer.get_vocab().values()) < 256
    assert len(set(tokenizer.get_vocab().values())) == len(tokenizer.get_vocab())
    assert AutoConfig.from_pretrained(tiny_folder).vocab_size == 256  # still the model's config.json
    again = AutoTokenizer.from_pretrained(tiny_folder)
    assert again("any text")["input_ids"] == tokenizer("any text")["input_ids"]


def test_a_smaller_vocab_keeps_ascii_lossless_and_marks_missing_bytes_unknown(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(write_tiny_llama(tmp_path / "m", num_blocks=1), 140))
    assert max(tokenizer.get_vocab().values()) == 139
    for text in ASCII_TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = tokenizer("日本", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id in ids and max(ids) < 140


def test_a_vocab_too_small_for_ascii_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 132"):
        write_tiny_tokenizer(tmp_path, vocab_size=100)
