"""IncrementalDetokenizer (``router/detokenize.py``): streamed pieces join to exactly the unary
text (``tokenizer.decode`` of every output id), and no piece but the last ends inside a UTF-8
sequence, on a real byte-level BPE trained in the session (``tests/fakes/tokenizer.py``) and on
the reference byte tokenizer. The Hugging Face ``tokenizers`` library's own incremental decoder
(``tokenizers.decoders.DecodeStream``, the one TensorRT-LLM's ``hf_decode_incrementally`` uses)
is the cross-check."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.fakes import tokenizer as fake_tokenizer
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer
from trtllm_prfaas.engines.tokenizer import ByteTokenizer, Tokenizer
from trtllm_prfaas.router.detokenize import IncrementalDetokenizer

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture
TEXT = "Café naïve — 東京で処理します 🚀✨ the quick fox ∑≈ 北京"


@pytest.fixture(scope="module")
def hf(hf_model_dir: Path) -> HfTokenizer:
    return HfTokenizer.from_dir(hf_model_dir)


def _stream(tokenizer: Tokenizer, ids: list[int], step: int = 1) -> list[str]:
    """Pieces of ``ids`` pushed ``step`` at a time, the flush last."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return [*pieces, detok.flush()]


def _splits_characters(tokenizer: Tokenizer, ids: list[int]) -> bool:
    return any("\ufffd" in tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_multibyte_text_streams_without_replacement_characters(hf: HfTokenizer, step: int) -> None:
    ids = hf.encode(TEXT)
    assert _splits_characters(hf, ids)  # the test means something: characters span tokens
    pieces = _stream(hf, ids, step)
    assert "".join(pieces) == hf.decode(ids) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert all(piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)


def test_pieces_equal_the_tokenizers_librarys_decode_stream(
    hf: HfTokenizer, hf_model_dir: Path
) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.decoders import DecodeStream

    ids = hf.encode(TEXT)
    rust = RustTokenizer.from_file(str(hf_model_dir / "tokenizer.json"))
    stream = DecodeStream(skip_special_tokens=True)
    theirs = [stream.step(rust, t) or "" for t in ids]
    assert _stream(hf, ids)[:-1] == theirs


def test_byte_tokenizer_holds_back_partial_characters() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("日本語 ok ✨")  # one token per byte: every character is split
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "日本語 ok ✨"
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[1:4] == ["", "", "日"]  # BOS, then two bytes held, the third completes it


def test_invalid_bytes_are_released_once_followed_like_the_unary_text() -> None:
    tok = ByteTokenizer()
    ids = [0xE6, ord("a"), 0xE6, 0x97]  # a lead byte cut off by "a"; an unfinished character
    pieces = _stream(tok, ids)
    assert pieces == ["", "\ufffda", "", "", "\ufffd"]  # the final flush: the unary text's end
    assert "".join(pieces) == tok.decode(ids)


def test_special_tokens_are_skipped(hf: HfTokenizer) -> None:
    assert hf.eos_id is not None and hf.bos_id is not None
    ids = [hf.bos_id, *hf.encode(" the 東京", add_special_tokens=False), hf.eos_id]
    pieces = _stream(hf, ids)
    assert "".join(pieces) == " the 東京" and pieces[0] == pieces[-2] == ""


@pytest.mark.parametrize("seed", range(6))
def test_random_ids_join_to_the_unary_text(hf: HfTokenizer, seed: int) -> None:
    """Arbitrary ids (what a random model emits: lone continuation bytes, cut characters):
    the join is still exactly the unary text, and only the flush may end in U+FFFD."""
    rng = random.Random(seed)
    ids = [rng.randrange(hf.vocab_size) for _ in range(200)]
    for step in (1, 4):
        pieces = _stream(hf, ids, step)
        assert "".join(pieces) == hf.decode(ids)
        assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
