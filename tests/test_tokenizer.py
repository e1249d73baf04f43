"""The GPT-2 tokenizer: known ids, the special token, lossless round trips, no network."""

import numpy as np
import pytest

from jaxrun import tokenizer


def test_known_ids():
    enc = tokenizer.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.eot_token == tokenizer.EOT_ID == 50256
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50257


@pytest.mark.parametrize(
    "text",
    ["", "Hello world", "  leading spaces\n\ttabs\r\n", "naïve café — 東京 🙂", "x" * 5000, "it's 3.14!"],
)
def test_round_trip(text):
    enc = tokenizer.get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < 50256 for i in ids)
    assert enc.decode(ids) == text


def test_special_text_is_not_special_by_default():
    enc = tokenizer.get_tokenizer()
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")
    ids = enc.encode_ordinary("<|endoftext|>")
    assert 50256 not in ids and enc.decode(ids) == "<|endoftext|>"


def test_offline(monkeypatch, tmp_path):
    """Building the encoding reads only the vendored file, never a URL."""
    import tiktoken.load

    local_read = tiktoken.load.read_file

    def read_file(path):
        assert "://" not in path, f"tokenizer tried to fetch {path}"
        return local_read(path)

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokenizer.get_tokenizer.cache_clear()
    try:
        assert tokenizer.get_tokenizer().encode("Hello world") == [15496, 995]
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_encode_documents():
    docs = tokenizer.encode_documents(["Hello world", "", "<|endoftext|>"])
    assert [d.dtype for d in docs] == [np.uint16] * 3
    assert docs[0].tolist() == [50256, 15496, 995] and docs[1].tolist() == [50256]
    assert tokenizer.get_tokenizer().decode(docs[2][1:].tolist()) == "<|endoftext|>"


def test_bad_hash_is_named(monkeypatch, tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"not the ranks\n")
    monkeypatch.setattr(tokenizer, "RANKS_FILE", bad)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="sha256"):
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()
