"""The served model's own Hugging Face tokenizer, loaded from its model directory.

A remote Triton ``llmapi`` model takes text (``text_input``) and answers text (``text_output``), so
a worker that speaks token ids to routers must turn ids into text and back exactly as the served
model does. ``HfTokenizer.from_dir(model_dir)`` reads ``tokenizer.json`` (and, when present,
``tokenizer_config.json``) with the ``tokenizers`` library; no ``transformers`` is needed.

What TensorRT-LLM does, and so what this class reproduces (NVIDIA/TensorRT-LLM):
- A text prompt is tokenized by ``DefaultInputProcessor.__call__`` as
  ``tokenizer.encode(prompt, add_special_tokens=sampling_params.add_special_tokens)``
  (``tensorrt_llm/inputs/registry.py``, stored copy 60646526203, commit 002f3cc). The Triton
  ``llmapi`` model never sets ``add_special_tokens`` (``helpers.py``
  ``get_sampling_params_from_request``, 0df60f9), so it is ``SamplingParams``' default, True:
  ``encode`` adds the special tokens of the tokenizer's post-processor (BOS for Llama-style
  models). ``encode(text)`` here defaults to the same.
- Output text is the detokenization of the generated ids with special tokens skipped
  (``SamplingParams.skip_special_tokens`` defaults to True); ``decode`` defaults to the same.
- ``transformers``' Llama-family fast tokenizers rebuild the post-processor from
  ``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` when they load
  (``LlamaTokenizerFast.update_post_processor``); for those tokenizer classes this class does the
  same, so a config that switches BOS off is honoured.

Limits: other tokenizer classes whose Python class overrides the ``tokenizer.json`` behaviour
(added-token normalisation, legacy SentencePiece quirks) are not modelled; tiktoken models are
not supported. Errors: a missing or unreadable directory raises ``ConfigError`` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtllm_prfaas.errors import ConfigError, DependencyMissing

__all__ = ["CumulativeText", "HfTokenizer"]

# tokenizer_config.json "tokenizer_class" values whose transformers class rebuilds the template
# post-processor from add_bos_token/add_eos_token at load time.
_TEMPLATE_CLASSES = frozenset(
    {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
     "GemmaTokenizer", "GemmaTokenizerFast"}
)  # fmt: skip


class HfTokenizer:
    """Encode and decode exactly as the served TensorRT-LLM model does (see module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        bos_id: int | None,
        eos_id: int | None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template  # the default Jinja template; None: the model has none
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> HfTokenizer:
        """Load ``model_dir/tokenizer.json`` (+ ``tokenizer_config.json`` when present)."""
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # a core dependency; only a broken install lands here
            raise DependencyMissing("tokenizers", "tokenizers") from exc
        root = Path(model_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"no tokenizer.json in the model directory {str(root)!r}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exception subclasses
            raise ConfigError(f"{path} is not a Hugging Face tokenizer: {exc}") from exc
        config = _read_config(root / "tokenizer_config.json")
        bos_id = _token_id(tokenizer, config.get("bos_token"))
        eos_id = _token_id(tokenizer, config.get("eos_token"))
        if config.get("tokenizer_class") in _TEMPLATE_CLASSES:
            _apply_template(tokenizer, config, bos_id, eos_id)
        return cls(tokenizer, bos_id, eos_id, _chat_template(root, config))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with the post-processor's special tokens by default."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; special tokens dropped by default. Incomplete UTF-8 sequences
        decode to U+FFFD (the byte-level decoder's behaviour)."""
        return str(self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def last_word_start(self, text: str) -> int:
        """Where the pre-tokenizer's last piece of ``text`` starts (a character offset); 0 when
        the tokenizer has no pre-tokenizer (the whole text is then one piece)."""
        pre = self._tok.pre_tokenizer
        if pre is None:
            return 0
        pieces = pre.pre_tokenize_str(text)
        return int(pieces[-1][1][0]) if pieces else 0


class CumulativeText:
    """Exact new token ids from the cumulative ``text_output`` of one streamed request.

    The ``llmapi`` model streams the WHOLE generated text so far in every response. ``push``
    re-encodes only the text after what was already emitted and emits the tokens of every
    pre-tokenizer piece but the last (a growing last word, or a character still incomplete, can
    still change its tokens), and only when encoding that stable text alone gives the same tokens
    as encoding it with what follows (BPE never merges across pre-tokenizer pieces, so this holds
    for byte-level and Metaspace tokenizers; when it does not, tokens wait). ``finish`` emits the
    rest from the final text.

    Limits: a tokenizer without a pre-tokenizer (legacy SentencePiece files) streams nothing until
    the final response (then everything, exactly). The ids are the re-encoding of the model's
    text: when the model generated a non-canonical tokenization, or the text ends inside a
    character (``max_tokens`` cut a multi-byte character), they differ from the model's own ids
    (text I/O cannot carry them); ``finish`` reports whether the emitted tokens are a prefix of
    the final text's full encoding.
    """

    def __init__(self, tokenizer: HfTokenizer) -> None:
        self._tok = tokenizer
        self._anchor = 0  # characters of the text already covered by emitted tokens
        self.emitted: list[int] = []

    def push(self, text: str) -> list[int]:
        """The new stable tokens of this (non-final) cumulative text."""
        suffix = text[self._anchor :]
        cut = self._tok.last_word_start(suffix)
        if cut <= 0:
            return []
        stable = self._tok.encode(suffix[:cut], add_special_tokens=False)
        if self._tok.encode(suffix, add_special_tokens=False)[: len(stable)] != stable:
            return []
        self._anchor += cut
        self.emitted += stable
        return stable

    def finish(self, text: str) -> tuple[list[int], bool]:
        """The remaining tokens of the final text, and whether every emitted token so far plus
        these equal the full encoding of ``text``."""
        rest = self._tok.encode(text[self._anchor :], add_special_tokens=False)
        full = self._tok.encode(text, add_special_tokens=False)
        self.emitted += rest
        return rest, full == self.emitted


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config


def _chat_template(root: Path, config: dict[str, Any]) -> str | None:
    """The default chat template as ``transformers`` finds it (``tokenization_utils_base.py``,
    stored copy 8802025098, ``CHAT_TEMPLATE_FILE``): ``chat_template.jinja`` beside the config
    wins over the config's ``chat_template``, a string or a list of ``{name, template}`` of
    which ``default`` is used."""
    sidecar = root / "chat_template.jinja"
    if sidecar.is_file():
        try:
            return sidecar.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{sidecar} is not readable: {exc}") from exc
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{root / 'tokenizer_config.json'}: chat_template must be a string")
    return template


def _token_id(tokenizer: Any, token: object) -> int | None:
    """The id of a special token given as a string or as a serialized ``AddedToken``."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    found = tokenizer.token_to_id(token)
    return None if found is None else int(found)


def _apply_template(
    tokenizer: Any, config: dict[str, Any], bos_id: int | None, eos_id: int | None
) -> None:
    """Rebuild the post-processor from ``add_bos_token``/``add_eos_token`` (Llama-style)."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    from tokenizers import processors

    add_bos = bool(config.get("add_bos_token", True)) and bos_id is not None
    add_eos = bool(config.get("add_eos_token", False)) and eos_id is not None
    bos, eos = tokenizer.id_to_token(bos_id) if add_bos else "", ""
    if add_eos:
        eos = tokenizer.id_to_token(eos_id)
    single = [t for t in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if t]
    pair = single + [t for t in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if t]
    specials = [(bos, bos_id)] if add_bos else []
    if add_eos:
        specials.append((eos, eos_id))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=specials
    )
