"""What ``load_tokenizer`` takes from a Hugging Face model directory besides the vocabulary: the
chat template, found where ``transformers`` finds it (``chat_template.jinja`` beside the config
wins over ``tokenizer_config.json``'s ``chat_template``, which is a string or a list of named
templates, ``default`` used), and the EOS token the router's handoff stops at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fakes import tokenizer as fake_tokenizer
from trtllm_prfaas.engines.tokenizer import ByteTokenizer, load_tokenizer
from trtllm_prfaas.errors import ConfigError

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def _copy(source: Path, target: Path, **config_updates: object) -> Path:
    target.mkdir()
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(config_updates)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_the_chat_template_is_loaded_from_the_config(hf_model_dir: Path, tmp_path: Path) -> None:
    assert load_tokenizer(str(hf_model_dir)).chat_template is None  # the fixture has none
    inline = _copy(hf_model_dir, tmp_path / "inline", chat_template=TEMPLATE)
    assert load_tokenizer(str(inline)).chat_template == TEMPLATE
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": TEMPLATE}]
    listed = _copy(hf_model_dir, tmp_path / "listed", chat_template=named)
    assert load_tokenizer(str(listed)).chat_template == TEMPLATE
    (inline / "chat_template.jinja").write_text("{{ sidecar }}")
    assert load_tokenizer(str(inline)).chat_template == "{{ sidecar }}"
    assert ByteTokenizer().chat_template is None and load_tokenizer("").chat_template is None


def test_a_tokenizer_without_eos_is_refused(hf_model_dir: Path, tmp_path: Path) -> None:
    no_eos = _copy(hf_model_dir, tmp_path / "no_eos", eos_token=None)
    with pytest.raises(ConfigError, match="no EOS token"):
        load_tokenizer(str(no_eos))
    bad = _copy(hf_model_dir, tmp_path / "bad", chat_template=3)
    with pytest.raises(ConfigError, match="chat_template must be a string"):
        load_tokenizer(str(bad))
