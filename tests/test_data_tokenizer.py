import pytest
from hypothesis import given, strategies as st

from jaxgpt.data.tokenizer import (
    CharTokenizer, GPT2Tokenizer, Tokenizer, TokenizerError, get_tokenizer, tokenizer_from_dict,
)

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terracesof someunknownPlace."
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 1659, 617, 34680, 27271, 13]


def test_gpt2_known_ids_and_sizes():
    tok = GPT2Tokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode(BOOK_TEXT, allow_special=True) == BOOK_IDS
    assert tok.decode(BOOK_IDS) == BOOK_TEXT


def test_gpt2_endoftext_only_when_allowed():
    with pytest.raises(TokenizerError, match="allow_special"):
        GPT2Tokenizer().encode(BOOK_TEXT)


@given(st.text(max_size=60))
def test_gpt2_roundtrip(text):
    tok = GPT2Tokenizer()
    assert tok.decode(tok.encode(text.replace("<|endoftext|>", ""))) == text.replace("<|endoftext|>", "")


def test_char_tokenizer_roundtrip_and_spec():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == len(set("hello world")) + 1
    ids = tok.encode("low<|endoftext|>he", allow_special=True)
    assert ids[3] == tok.eot_id
    assert tok.decode(ids) == "low<|endoftext|>he"
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode("hello") == tok.encode("hello")


def test_char_tokenizer_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([99])
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")
