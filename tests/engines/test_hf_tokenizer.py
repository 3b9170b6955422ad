"""HfTokenizer (the served model's tokenizer, loaded from its Hugging Face directory) and
CumulativeText (cumulative streamed text -> exact new token ids), on a real BPE tokenizer
trained in the test session (``tests/fakes/tokenizer.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fakes import tokenizer as fake_tokenizer
from trtllm_prfaas.engines.hf_tokenizer import CumulativeText, HfTokenizer
from trtllm_prfaas.errors import ConfigError

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture
TEXT = " naïve façade 東京 🚀✨🙂 streams KV across datacenters ∑∫≈≠. the lazy dog"


@pytest.fixture
def tokenizer(hf_model_dir: Path) -> HfTokenizer:
    return HfTokenizer.from_dir(hf_model_dir)


def test_encode_adds_bos_like_tensorrt_llm_and_decode_skips_it(tokenizer: HfTokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_id and tokenizer.bos_id not in ids[1:]
    assert tokenizer.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids) == TEXT  # byte-level: any UTF-8 text round-trips
    assert tokenizer.decode(ids, skip_special_tokens=False) == fake_tokenizer.BOS + TEXT
    assert tokenizer.eos_id is not None and tokenizer.eos_id in tokenizer.special_ids


def test_missing_or_broken_files_are_config_errors(tmp_path: Path, hf_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        HfTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ConfigError, match="not a Hugging Face tokenizer"):
        HfTokenizer.from_dir(tmp_path)
    shutil.copy(hf_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="JSON object"):
        HfTokenizer.from_dir(tmp_path)


def test_llama_style_config_switches_bos_off(tmp_path: Path, hf_model_dir: Path) -> None:
    shutil.copy(hf_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((hf_model_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=False, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HfTokenizer.from_dir(tmp_path)
    ids = tok.encode("the dog")
    assert ids[-1] == tok.eos_id and tok.bos_id not in ids


def _stream(tokenizer: HfTokenizer, ids: list[int]) -> tuple[list[list[int]], list[int], bool]:
    """What the llmapi model streams for generated ``ids`` (cumulative text, incomplete characters
    held back), fed through CumulativeText: (per-response new tokens, final tokens, exact)."""
    text = CumulativeText(tokenizer)
    pushed = []
    for n in range(1, len(ids)):
        pushed.append(text.push(tokenizer.decode(ids[:n]).rstrip("\ufffd")))
    final, exact = text.finish(tokenizer.decode(ids))
    return pushed, final, exact


def test_cumulative_text_streams_exact_new_tokens(tokenizer: HfTokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pushed, final, exact = _stream(tokenizer, ids)
    assert [t for new in pushed for t in new] + final == ids and exact
    assert sum(map(len, pushed)) > len(ids) // 2  # it streams, not all at the end
    assert len(final) < 8  # only the last word waits for the final response


def test_cumulative_text_of_a_non_canonical_tokenization_is_the_text_reencoded(
    tokenizer: HfTokenizer,
) -> None:
    spelled = [
        t for c in " datacenters 東京" for t in tokenizer.encode(c, add_special_tokens=False)
    ]
    assert spelled != tokenizer.encode(" datacenters 東京", add_special_tokens=False)
    pushed, final, exact = _stream(tokenizer, spelled)
    tokens = [t for new in pushed for t in new] + final
    assert tokens == tokenizer.encode(" datacenters 東京", add_special_tokens=False) and exact


def test_text_ending_inside_a_character_is_reported(tokenizer: HfTokenizer) -> None:
    ids = tokenizer.encode(" the 東京", add_special_tokens=False)
    cut = ids[:-1]  # max_tokens ends inside the last character
    assert tokenizer.decode(cut).endswith("\ufffd")
    pushed, final, exact = _stream(tokenizer, cut)
    tokens = [t for new in pushed for t in new] + final
    assert tokenizer.decode(tokens) == tokenizer.decode(cut)  # the text is kept
    assert tokens != cut  # but text I/O cannot carry the partial character's ids
    assert exact


def test_a_tokenizer_without_pre_tokenizer_streams_only_at_the_end(
    tmp_path: Path, hf_model_dir: Path
) -> None:
    spec = json.loads((hf_model_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = None  # as legacy SentencePiece conversions have
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = HfTokenizer.from_dir(tmp_path)
    ids = tok.encode("the lazy dog", add_special_tokens=False)
    pushed, final, exact = _stream(tok, ids)
    assert not any(pushed) and final == ids and exact
