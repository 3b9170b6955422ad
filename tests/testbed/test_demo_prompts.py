"""The demo's prompts are sized in tokens of the served tokenizer (byte tokenizer by default)."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.tokenizer import hf_model_dir  # noqa: F401 (session fixture)
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer
from trtllm_prfaas.engines.tokenizer import ByteTokenizer
from trtllm_prfaas.testbed import demo

THRESHOLD = 200


def wanted(threshold: int) -> list[int]:
    return [60, threshold // 2, threshold * 2, max(8, threshold // 4), threshold * 4,
            threshold + 50]  # fmt: skip


def test_byte_prompts_are_bytes_plus_bos_as_before() -> None:
    results = demo.demo_prompts(THRESHOLD)
    tokenizer = ByteTokenizer()
    assert [len(tokenizer.encode(r.prompt)) for r in results] == wanted(THRESHOLD)
    assert [len(r.prompt) for r in results] == [n - 1 for n in wanted(THRESHOLD)]
    assert results[2].prompt.startswith(results[0].prompt)  # prefixes of one repeated text


def test_hf_prompts_have_the_token_counts_of_the_served_tokenizer(hf_model_dir: Path) -> None:  # noqa: F811
    tokenizer = HfTokenizer.from_dir(hf_model_dir)
    results = demo.demo_prompts(THRESHOLD, tokenizer)
    counts = [len(tokenizer.encode(r.prompt)) for r in results]
    # at least the target, and at most one more (one character may close two tokens)
    assert all(0 <= got - want <= 1 for got, want in zip(counts, wanted(THRESHOLD), strict=True))
    assert len(set(counts)) == len(counts)  # up.py matches route decisions by prompt length
    # the byte sizing would have been far off: BPE packs several bytes in a token
    assert sum(len(r.prompt.encode()) for r in results) > 1.5 * sum(counts)


def test_text_of_tokens_edges() -> None:
    tokenizer = ByteTokenizer()
    assert demo.text_of_tokens(tokenizer, "ab", 1) == ""  # BOS alone
    assert demo.text_of_tokens(tokenizer, "ab", 2) == "a"
    assert demo.text_of_tokens(tokenizer, "ab", 6) == "ababa"


def test_loadgen_prompts_in_served_tokens(hf_model_dir: Path) -> None:  # noqa: F811
    """``prfaas bench --tokenizer DIR``: text and ids sized in the served tokenizer's tokens;
    without a tokenizer, the byte prompts as before."""
    from trtllm_prfaas.engines.tokenizer import BOS_ID
    from trtllm_prfaas.loadgen.prompts import prompt_ids, prompt_text

    tokenizer = HfTokenizer.from_dir(hf_model_dir)
    for num_tokens in (2, 17, 300, 2000):
        text = prompt_text(num_tokens, 3, 9, tokenizer)
        assert 0 <= len(tokenizer.encode(text)) - num_tokens <= 1, num_tokens
        assert prompt_ids(num_tokens, 3, 9, tokenizer) == tokenizer.encode(text)
        assert prompt_text(num_tokens, 3, 9, tokenizer) == text  # deterministic
    assert prompt_text(300, 3, 9, tokenizer) != prompt_text(300, 4, 9, tokenizer)
    ids = prompt_ids(300, 3, 9)
    assert len(ids) == 300 and ids[0] == BOS_ID
    assert bytes(ids[1:]).decode() == prompt_text(300, 3, 9)
