"""The OpenAI door's request side: JSON bodies -> ``GenerateRequest``s, chat prompts, stops.

Pure (no sockets, no event loop), so the door runs it in a worker thread and a large body never
stalls the loop that also serves gRPC. Every refusal is an ``InvalidRequestError`` whose
``FieldError.param`` names the body field, as OpenAI's ``{"error": {"param": ...}}`` does.

What is honoured, and what is refused (never silently ignored). Field names and defaults follow
the OpenAI API as TensorRT-LLM's ``trtllm-serve`` models it (NVIDIA/TensorRT-LLM
``tensorrt_llm/serve/openai_protocol.py``, stored copy 71075524054, commit 0076e93:
``CompletionRequest``, ``ChatCompletionRequest``, ``StreamOptions``):

- honoured: ``model`` (must be the served one: otherwise ``ModelNotFound``, 404), ``prompt``
  (text, or token ids; one prompt), ``messages`` (text content), ``max_tokens`` /
  ``max_completion_tokens`` (completions default 16, OpenAI's; chat default: the rest of the
  context), ``temperature`` (default 1.0; 0 is greedy), ``seed`` (absent: a random one, so
  sampling is not reproducible unless asked), ``stop`` (strings; the output is cut before the
  first one and the request cancelled), ``stream``, ``stream_options.include_usage``, ``n`` /
  ``best_of`` = 1, ``user`` (an end-user id; carried nowhere);
- refused when not neutral (``_REFUSALS``): ``top_p`` != 1, penalties, ``logit_bias``,
  ``logprobs``, ``echo``, ``suffix``, tools, ``response_format`` other than text, and the
  vLLM / trtllm-serve extensions benchmark tools send (``top_k`` other than 0/-1/1, ``min_p``,
  ``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids``...);
- any other field: "Unrecognized request argument supplied" (OpenAI's wording; trtllm-serve's
  models also forbid extra fields).

Chat prompts: the served tokenizer's own chat template (``HfTokenizer.chat_template``) rendered
as ``transformers`` renders it (``src/transformers/utils/chat_template_utils.py``, stored copy
64057454158, ``_cached_compile_jinja_template`` / ``render_jinja_template``: a sandboxed Jinja
environment with ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` filter and
the ``raise_exception`` / ``strftime_now`` globals; ``messages``, ``add_generation_prompt`` and the
special tokens as variables), then encoded WITHOUT adding special tokens, since the template writes
them (trtllm-serve's chat ``add_special_tokens`` defaults to False). The reference engine's byte
tokenizer has no template: ``SIMPLE_CHAT_TEMPLATE`` is used, and the prompt is encoded as any
prompt (BOS first). An HF tokenizer without a template refuses chat requests (transformers does).
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer
from trtllm_prfaas.engines.tokenizer import Tokenizer
from trtllm_prfaas.errors import InvalidRequestError, ModelNotFound
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator

__all__ = [
    "COMPLETIONS_MAX_TOKENS",
    "SIMPLE_CHAT_TEMPLATE",
    "ChatPrompt",
    "FieldError",
    "ModelNotFound",
    "OpenAIRequest",
    "StopCutter",
    "parse_chat",
    "parse_completion",
]

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's (and trtllm-serve's) /v1/completions max_tokens default
MAX_SEED = 2**64 - 1  # Triton's sampling_param_seed is UINT64; torch.manual_seed takes it
MAX_STOPS = 4  # OpenAI: "Up to 4 sequences"

# The byte tokenizer's chat template (the reference model was trained on no chat format, so
# any unambiguous layout will do): one "<|role|>" line per message, then its content, then
# "<|assistant|>" and a newline for the model to continue.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class FieldError(InvalidRequestError):
    """A request field is wrong; ``param`` names it (dotted path, None for the whole body)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------ body schema
class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM/trtllm-serve: usage on every chunk


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints take. ``Any`` fields are checked by ``_REFUSALS``."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    ignore_eos: Any = None
    min_tokens: Any = None
    stop_token_ids: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    add_special_tokens: Any = None


class _CompletionBody(_Body, kw_only=True, forbid_unknown_fields=True):
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]: checked by _prompt_ids
    best_of: int | None = None
    echo: Any = None
    logprobs: Any = None
    suffix: Any = None


class _ChatBody(_Body, kw_only=True, forbid_unknown_fields=True):
    messages: Any = None  # a list of {role, content[, name]}: checked by _messages
    max_completion_tokens: int | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None


@dataclass(frozen=True)
class _Refusal:
    feature: str
    is_neutral: Callable[[Any], bool]  # the values that ask for nothing the engine lacks


def _none_or(*allowed: Any) -> Callable[[Any], bool]:
    """Absent, or one of ``allowed`` (booleans match only booleans: ``0`` is not ``False``)."""

    def is_neutral(value: Any) -> bool:
        return value is None or any(_same(value, a) for a in allowed)

    return is_neutral


def _same(value: Any, allowed: Any) -> bool:
    if isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed
    return bool(value == allowed)


def _falsy(value: Any) -> bool:
    return value is None or value is False or value == 0 or value in ("", [], {})


_REFUSALS: Mapping[str, _Refusal] = {
    "frequency_penalty": _Refusal("a frequency penalty (only 0)", _none_or(0)),
    "presence_penalty": _Refusal("a presence penalty (only 0)", _none_or(0)),
    "logit_bias": _Refusal("a logit bias", _falsy),
    "logprobs": _Refusal("log probabilities", _falsy),
    "top_logprobs": _Refusal("log probabilities", _falsy),
    "echo": _Refusal("echoing the prompt", _none_or(False)),
    "suffix": _Refusal("a suffix (insertion)", _falsy),
    "tools": _Refusal("tools (function calling)", _falsy),
    "tool_choice": _Refusal("tools (function calling)", _none_or("none")),
    "parallel_tool_calls": _Refusal("tools (function calling)", _none_or(True, False)),
    "response_format": _Refusal(
        "structured output (only {'type': 'text'})", lambda v: v is None or v == {"type": "text"}
    ),
    "top_k": _Refusal("top-k sampling (0 or -1: off, 1: greedy)", _none_or(0, -1, 1)),
    "min_p": _Refusal("min-p sampling (only 0)", _none_or(0)),
    "repetition_penalty": _Refusal("a repetition penalty (only 1)", _none_or(1)),
    "ignore_eos": _Refusal("ignoring EOS", _none_or(False)),
    "min_tokens": _Refusal("a minimum output length (only 0)", _none_or(0)),
    "stop_token_ids": _Refusal("stop token ids", _falsy),
    "include_stop_str_in_output": _Refusal("keeping the stop string", _none_or(False)),
    "skip_special_tokens": _Refusal("special tokens in the output", _none_or(True)),
}


# ------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class OpenAIRequest:
    """A validated request: what to generate and how to answer it."""

    gen: GenerateRequest
    stops: tuple[str, ...]
    is_stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ParseContext:
    """What parsing needs from the server: the served model and its tokenizer."""

    orchestrator: Orchestrator
    chat: ChatPrompt
    request_id: str
    deadline_s: float


def parse_completion(body: bytes, ctx: ParseContext) -> OpenAIRequest:
    """A ``/v1/completions`` body as a request; FieldError / ModelNotFound say what is wrong."""
    parsed = _decode(body, _CompletionBody, ctx)
    _refuse(parsed, ("n", "best_of"), add_special_tokens=True)  # BOS, as the gRPC door
    prompt = _prompt_ids(parsed.prompt, ctx.orchestrator)
    max_tokens = _default(parsed.max_tokens, COMPLETIONS_MAX_TOKENS)
    return _request(parsed, prompt, max_tokens, "max_tokens", "prompt", ctx)


def parse_chat(body: bytes, ctx: ParseContext) -> OpenAIRequest:
    """A ``/v1/chat/completions`` body as a request (its messages through the chat template)."""
    parsed = _decode(body, _ChatBody, ctx)
    _refuse(parsed, ("n",), add_special_tokens=False)  # the chat template writes them
    prompt = ctx.chat.encode(_messages(parsed.messages))
    name, wanted = "max_completion_tokens", parsed.max_completion_tokens
    if parsed.max_tokens is not None:
        if wanted is not None and wanted != parsed.max_tokens:
            raise FieldError("max_tokens and max_completion_tokens differ; give one", name)
        name, wanted = "max_tokens", parsed.max_tokens
    rest = ctx.orchestrator.max_seq_len - len(prompt)
    return _request(parsed, prompt, _default(wanted, rest), name, "messages", ctx)


def _decode(body: bytes, kind: type[_Body], ctx: ParseContext) -> Any:
    """JSON -> ``kind``; the model is checked first (an unknown one is 404 whatever else)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise FieldError(f"the request body is not valid JSON: {exc}", None) from exc
    if not isinstance(data, dict):
        raise FieldError("the request body must be a JSON object", None)
    model = data.get("model")
    if isinstance(model, str) and model != ctx.orchestrator.model_name:
        raise ModelNotFound(
            f"The model `{model}` does not exist; this server serves "
            f"`{ctx.orchestrator.model_name}`"
        )
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise _field_error(str(exc)) from exc


_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")


def _field_error(message: str) -> FieldError:
    """msgspec's message as OpenAI words it, with the field's path as ``param``."""
    at = _AT.search(message)
    path = re.sub(r"\[\d+\]", "", at.group(1)) if at else ""
    for pattern, wording in ((_UNKNOWN, "Unrecognized request argument supplied: {}"),
                             (_MISSING, "Missing required parameter: '{}'")):  # fmt: skip
        found = pattern.match(message)
        if found:
            name = f"{path}.{found.group(1)}" if path else found.group(1)
            return FieldError(wording.format(name), name)
    return FieldError(f"Invalid value for '{path}': {message}", path or None)


def _refuse(parsed: _Body, must_be_one: Sequence[str], add_special_tokens: bool) -> None:
    """Refuse what the engine cannot honour (``_REFUSALS``, ``top_p``), naming the field."""
    if parsed.add_special_tokens not in (None, add_special_tokens):
        raise FieldError(f"add_special_tokens: only {str(add_special_tokens).lower()} here",
                         "add_special_tokens")  # fmt: skip
    for name in must_be_one:
        value = getattr(parsed, name)
        if value not in (None, 1):
            raise FieldError(f"{name}: only {name}=1 is supported, got {value}", name)
    for name, refusal in _REFUSALS.items():
        value = getattr(parsed, name, None)
        if not refusal.is_neutral(value):
            raise FieldError(
                f"'{name}' asks for {refusal.feature}, which this server cannot honour "
                f"(got {value!r})",
                name,
            )
    if parsed.top_p is not None and parsed.top_p != 1.0:
        if not 0.0 < parsed.top_p <= 1.0:
            raise FieldError(f"top_p must be in (0, 1], got {parsed.top_p}", "top_p")
        raise FieldError(
            f"'top_p' asks for top-p sampling (only 1.0: off), which this server cannot honour "
            f"(got {parsed.top_p})",
            "top_p",
        )


def _request(
    parsed: _Body,
    prompt: list[int],
    max_tokens: int,
    max_name: str,
    prompt_name: str,
    ctx: ParseContext,
) -> OpenAIRequest:
    """The validated sampling fields, the length check, and the request."""
    temperature = _default(parsed.temperature, 1.0)
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        raise FieldError(f"temperature must be in [0, 2], got {temperature}", "temperature")
    if parsed.top_k == 1:
        temperature = 0.0  # top-k 1 is greedy
    seed = secrets.randbits(63) if parsed.seed is None else parsed.seed
    if not 0 <= seed <= MAX_SEED:
        raise FieldError(f"seed must be in [0, {MAX_SEED}], got {seed}", "seed")
    _check_length(len(prompt), max_tokens, max_name, prompt_name, ctx.orchestrator.max_seq_len)
    is_stream = bool(parsed.stream)
    options = parsed.stream_options
    if options is not None and not is_stream:
        raise FieldError("stream_options can only be set if stream is true", "stream_options")
    if options is not None and options.continuous_usage_stats:
        raise FieldError("stream_options.continuous_usage_stats is not supported; usage comes "
                         "in the last chunk", "stream_options.continuous_usage_stats")  # fmt: skip
    gen = GenerateRequest(ctx.request_id, prompt, max_tokens, temperature, seed, True,
                          ctx.deadline_s)  # fmt: skip
    include_usage = bool(options is not None and options.include_usage)
    return OpenAIRequest(gen, _stops(parsed.stop), is_stream, include_usage)


def _check_length(
    num_prompt: int, max_tokens: int, max_name: str, prompt_name: str, max_seq_len: int
) -> None:
    if num_prompt >= max_seq_len:
        raise FieldError(
            f"This model's maximum context length is {max_seq_len} tokens; the {prompt_name} "
            f"alone has {num_prompt} tokens",
            prompt_name,
        )
    if max_tokens <= 0:
        raise FieldError(f"{max_name} must be > 0, got {max_tokens}", max_name)
    if num_prompt + max_tokens > max_seq_len:
        raise FieldError(
            f"This model's maximum context length is {max_seq_len} tokens. However, you "
            f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the {prompt_name}, "
            f"{max_tokens} in the completion). Please reduce the length of the {prompt_name} "
            f"or {max_name}.",
            max_name,
        )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > MAX_STOPS:
        raise FieldError(f"stop: at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise FieldError("stop: a stop sequence is empty", "stop")
    return tuple(stops)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


# ----------------------------------------------------------------------------- prompts
def _prompt_ids(prompt: Any, orchestrator: Orchestrator) -> list[int]:
    """Token ids of the one prompt a completions request may carry (text or token ids)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise FieldError("prompt is empty", "prompt")
        return orchestrator.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        for position, token in enumerate(prompt):
            if not 0 <= token < orchestrator.vocab_size:
                raise FieldError(
                    f"prompt: token {token} at position {position} is outside the vocabulary "
                    f"[0, {orchestrator.vocab_size})",
                    "prompt",
                )
        return list(prompt)
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise FieldError(
            f"prompt: {len(prompt)} prompts in one request are not supported; send one request "
            "per prompt",
            "prompt",
        )
    if prompt is None:
        raise FieldError("Missing required parameter: 'prompt'", "prompt")
    raise FieldError("prompt must be a string, a list of token ids, or a list of one of "
                     "those", "prompt")  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(messages: Any) -> list[dict[str, str]]:
    """The conversation as the template's ``messages``: roles and text content."""
    if messages is None:
        raise FieldError("Missing required parameter: 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages must be a non-empty list of messages", "messages")
    return [_message(m, i) for i, m in enumerate(messages)]


_ROLES = ("system", "developer", "user", "assistant")


def _message(message: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise FieldError(f"{where} must be an object with 'role' and 'content'", where)
    role = message.get("role")
    if role in ("tool", "function") or message.get("tool_calls"):
        raise FieldError(f"{where}: tools (function calling) are not supported", f"{where}.role")
    if role not in _ROLES:
        raise FieldError(f"{where}.role must be one of {list(_ROLES)}, got {role!r}",
                         f"{where}.role")  # fmt: skip
    unknown = sorted(set(message) - {"role", "content", "name"})
    if unknown:
        raise FieldError(f"Unrecognized request argument supplied: {where}.{unknown[0]}",
                         f"{where}.{unknown[0]}")  # fmt: skip
    out = {"role": role, "content": _content(message.get("content"), where)}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _content(content: Any, where: str) -> str:
    """Text content: a string, or text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):  # fmt: skip
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise FieldError(f"{where}.content: only text parts are supported, got {kind!r}",
                                 f"{where}.content")  # fmt: skip
            texts.append(part["text"])
        return "\n".join(texts)
    raise FieldError(f"{where}.content must be a string or a list of text parts",
                     f"{where}.content")  # fmt: skip


class ChatPrompt:
    """Renders a conversation with the served tokenizer's template and encodes it.

    Built once per server (the template is compiled here; a template that does not parse is a
    ``ConfigError`` at startup, not a per-request error). ``encode`` is pure and thread-safe."""

    def __init__(self, tokenizer: Tokenizer, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator
        self._hf = tokenizer if isinstance(tokenizer, HfTokenizer) else None
        self._variables: dict[str, str] = {}
        source: str | None = SIMPLE_CHAT_TEMPLATE
        if self._hf is not None:
            source = self._hf.chat_template
            for name, token_id in (("bos_token", self._hf.bos_id), ("eos_token", self._hf.eos_id)):
                if token_id is not None:
                    self._variables[name] = self._hf.decode([token_id], skip_special_tokens=False)
        self._template = None if source is None else _compile(source)

    @property
    def has_template(self) -> bool:
        return self._template is not None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages`` (FieldError when the template refuses them)."""
        if self._template is None:
            raise FieldError("the served model's tokenizer has no chat template "
                             "(tokenizer_config.json 'chat_template' or chat_template.jinja); "
                             "use /v1/completions", "messages")  # fmt: skip
        import jinja2

        try:
            return str(self._template.render(messages=messages, add_generation_prompt=True,
                                             **self._variables))  # fmt: skip
        except jinja2.TemplateError as exc:
            raise FieldError(f"the chat template refused the messages: {exc}", "messages") from exc

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.render(messages)
        if self._hf is not None:  # the template wrote the special tokens itself
            return self._hf.encode(text, add_special_tokens=False)
        return self._orchestrator.encode(text)


def _compile(source: str) -> Any:
    """The template compiled as transformers compiles chat templates (module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from trtllm_prfaas.errors import ConfigError

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)  # fmt: skip

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])  # fmt: skip
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"the served model's chat template does not parse: {exc}") from exc


# ----------------------------------------------------------------------------- stop strings
class StopCutter:
    """Cuts a request's streamed text before the first stop string.

    ``push(text)`` returns the text that can be released now: it holds back the last
    ``longest stop - 1`` characters, which could be the start of a stop string still arriving
    (as vLLM's detokenizer does). Once a stop string appears, ``stopped`` names it and nothing
    after it is ever released. ``flush()`` releases what was held back when the output ended
    without a stop string. Joined, the released pieces are the output text up to (excluding)
    the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._text = ""
        self._sent = 0  # characters released; no stop string starts before this
        self.stopped: str | None = None

    def push(self, text: str) -> str:
        if self.stopped is not None:
            return ""
        self._text += text
        if not self._stops:
            return self._release(len(self._text))
        found = [(i, s) for s in self._stops if (i := self._text.find(s, self._sent)) >= 0]
        if found:
            index, self.stopped = min(found)
            return self._release(index)
        return self._release(max(len(self._text) - self._hold, self._sent))

    def flush(self) -> str:
        return "" if self.stopped is not None else self._release(len(self._text))

    def _release(self, end: int) -> str:
        piece, self._sent = self._text[self._sent : end], end
        return piece
