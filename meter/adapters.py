"""Provider usage blocks -> meter's non-overlapping token buckets (docs/adapters.md).

Every provider reports usage its own way, and the usual bug is counting a token twice:
OpenAI and Gemini include cached tokens in the prompt count, Anthropic and Bedrock report
them beside it, LiteLLM folds cache writes into ``prompt_tokens`` as well. Each adapter here
takes a provider's raw usage block (the JSON object, as a dict) and returns a
:class:`Usage` whose buckets never overlap:

* ``input_tokens``: uncached input only;
* ``cache_read_tokens``, ``cache_write_tokens`` (5-minute), ``cache_write_1h_tokens``;
* ``output_tokens``: everything billed as output, reasoning/thinking included;
* ``reasoning_tokens``: the reasoning part of output, informational (never priced again).

A :class:`Usage` carries its ``usage_format`` tag, and :func:`to_usage` refuses a block
that is already a Usage or carries a ``usage_format`` key, so the same block is never
mapped twice; a block of the wrong shape for its format (say an Anthropic block given as
``openai.chat``) is an :class:`AdapterError`, as is any count that is not a non-negative
integer or a split that would go negative.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

ANTHROPIC = "anthropic.messages"
OPENAI_CHAT = "openai.chat"
OPENAI_RESPONSES = "openai.responses"
GEMINI = "gemini"
BEDROCK = "bedrock.converse"
LITELLM = "litellm"

TOKEN_MAX = 1_000_000_000


class AdapterError(ValueError):
    """A usage block that cannot be mapped safely; the message names the field."""


@dataclass(frozen=True)
class Usage:
    """One request's usage in meter's buckets, tagged with the format it was mapped from."""

    usage_format: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        for name, value in self.buckets().items():
            if not 0 <= value <= TOKEN_MAX:
                raise AdapterError(f"{self.usage_format}: {name} = {value} is not in 0..{TOKEN_MAX}")
        if self.reasoning_tokens > self.output_tokens:
            raise AdapterError(f"{self.usage_format}: reasoning tokens exceed output tokens")

    def buckets(self) -> dict[str, int]:
        """The six token fields of a usage event (meter.schema.TOKEN_COLUMNS)."""
        out = asdict(self)
        del out["usage_format"]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The buckets plus the usage_format tag (which to_usage refuses to map again)."""
        return asdict(self)


# ---------------------------------------------------------------- helpers


def _count(block: Mapping[str, Any], key: str, where: str, required: bool = False) -> int:
    value = block.get(key)
    if value is None:
        if required:
            raise AdapterError(f"{where}: {key} is missing")
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{where}: {key} must be an integer, got {value!r}")
    if value < 0:
        raise AdapterError(f"{where}: {key} is negative")
    return value


def _object(block: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = block.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AdapterError(f"{where}: {key} must be an object")
    return value


def _part(whole: int, part: int, where: str, whole_name: str, part_name: str) -> int:
    if part > whole:
        raise AdapterError(
            f"{where}: {part_name} ({part}) exceeds {whole_name} ({whole}): "
            "was this block already split, or given under the wrong format?"
        )
    return whole - part


def _expect(block: Mapping[str, Any], where: str, present: Iterable[str], absent: Iterable[str] = ()) -> None:
    """Shape check: the keys that identify this format are there, another format's are not."""
    for key in present:
        if key not in block:
            raise AdapterError(f"{where}: {key} is missing (is this block of another format?)")
    for key in absent:
        if key in block:
            raise AdapterError(f"{where}: unexpected {key} (is this block of another format?)")


_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def _camel(block: Mapping[str, Any]) -> dict[str, Any]:
    """Gemini's SDKs use snake_case, its REST API camelCase: accept both, as camelCase."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        parts = key.split("_")
        out[parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])] = value
    return out


# ---------------------------------------------------------------- adapters


def anthropic_messages(usage: Mapping[str, Any]) -> Usage:
    """Anthropic Messages API ``usage``.

    ``input_tokens`` already excludes cache reads and writes; cache writes are split into
    5-minute and 1-hour by ``cache_creation`` when present (else all 5-minute, the default
    TTL); thinking tokens are part of ``output_tokens``.
    """
    where = ANTHROPIC
    _expect(usage, where, ("input_tokens", "output_tokens"), ("prompt_tokens", "inputTokens"))
    written = _count(usage, "cache_creation_input_tokens", where)
    split = _object(usage, "cache_creation", where)
    if split:
        w5 = _count(split, "ephemeral_5m_input_tokens", where)
        w1h = _count(split, "ephemeral_1h_input_tokens", where)
        if "cache_creation_input_tokens" in usage and w5 + w1h != written:
            raise AdapterError(
                f"{where}: cache_creation splits into {w5} + {w1h}, not cache_creation_input_tokens {written}"
            )
    else:
        w5, w1h = written, 0
    return Usage(
        usage_format=ANTHROPIC,
        input_tokens=_count(usage, "input_tokens", where, True),
        output_tokens=_count(usage, "output_tokens", where, True),
        cache_read_tokens=_count(usage, "cache_read_input_tokens", where),
        cache_write_tokens=w5,
        cache_write_1h_tokens=w1h,
    )


def anthropic_stream(events: Iterable[Mapping[str, Any]]) -> Usage:
    """The usage of a streamed Anthropic message, from its server-sent events.

    ``message_start`` carries the initial usage (input and cache counts, a first output
    count); each ``message_delta`` carries usage that is cumulative, not an increment. The
    final usage is the start's, overridden field by field by the last delta: summing the
    events would count tokens twice.
    """
    merged: dict[str, Any] = {}
    seen_start = False
    for event in events:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if not isinstance(message, Mapping):
                raise AdapterError(f"{ANTHROPIC}: message_start without a message")
            merged = dict(_object(message, "usage", ANTHROPIC))
            seen_start = True
        elif kind == "message_delta":
            for key, value in _object(event, "usage", ANTHROPIC).items():
                if value is not None:
                    merged[key] = value
    if not seen_start:
        raise AdapterError(f"{ANTHROPIC}: the stream has no message_start event")
    return anthropic_messages(merged)


def openai_chat(usage: Mapping[str, Any]) -> Usage:
    """OpenAI Chat Completions ``usage`` (also the final chunk of a stream with
    ``stream_options.include_usage``).

    ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``; ``completion_tokens``
    includes ``completion_tokens_details.reasoning_tokens``. OpenAI does not bill cache writes.
    """
    where = OPENAI_CHAT
    _expect(
        usage, where, ("prompt_tokens", "completion_tokens"), ("input_tokens", "cache_creation_input_tokens")
    )
    prompt = _count(usage, "prompt_tokens", where, True)
    completion = _count(usage, "completion_tokens", where, True)
    cached = _count(_object(usage, "prompt_tokens_details", where), "cached_tokens", where)
    reasoning = _count(_object(usage, "completion_tokens_details", where), "reasoning_tokens", where)
    _check_total(usage, "total_tokens", prompt + completion, where)
    return Usage(
        usage_format=OPENAI_CHAT,
        input_tokens=_part(prompt, cached, where, "prompt_tokens", "cached_tokens"),
        output_tokens=completion,
        cache_read_tokens=cached,
        reasoning_tokens=reasoning,
    )


def openai_responses(usage: Mapping[str, Any]) -> Usage:
    """OpenAI Responses API ``usage``: ``input_tokens`` includes
    ``input_tokens_details.cached_tokens``; ``output_tokens`` includes
    ``output_tokens_details.reasoning_tokens``."""
    where = OPENAI_RESPONSES
    _expect(usage, where, ("input_tokens", "output_tokens"), ("prompt_tokens", "cache_read_input_tokens"))
    given = _count(usage, "input_tokens", where, True)
    output = _count(usage, "output_tokens", where, True)
    cached = _count(_object(usage, "input_tokens_details", where), "cached_tokens", where)
    reasoning = _count(_object(usage, "output_tokens_details", where), "reasoning_tokens", where)
    _check_total(usage, "total_tokens", given + output, where)
    return Usage(
        usage_format=OPENAI_RESPONSES,
        input_tokens=_part(given, cached, where, "input_tokens", "cached_tokens"),
        output_tokens=output,
        cache_read_tokens=cached,
        reasoning_tokens=reasoning,
    )


def gemini(usage_metadata: Mapping[str, Any]) -> Usage:
    """Google Gemini ``usageMetadata`` (camelCase or the SDKs' snake_case).

    ``promptTokenCount`` includes ``cachedContentTokenCount``; tool-use prompt tokens are
    counted apart and billed as input; ``thoughtsTokenCount`` is not in
    ``candidatesTokenCount`` but is billed at the output price, so output = candidates +
    thoughts. Cache creation is billed as ordinary input.
    """
    where = GEMINI
    block = _camel(usage_metadata)
    _expect(block, where, ("promptTokenCount",), ("inputTokens", "promptTokens"))
    prompt = _count(block, "promptTokenCount", where, True)
    cached = _count(block, "cachedContentTokenCount", where)
    tool_prompt = _count(block, "toolUsePromptTokenCount", where)
    candidates = _count(block, "candidatesTokenCount", where)
    thoughts = _count(block, "thoughtsTokenCount", where)
    return Usage(
        usage_format=GEMINI,
        input_tokens=_part(prompt, cached, where, "promptTokenCount", "cachedContentTokenCount")
        + tool_prompt,
        output_tokens=candidates + thoughts,
        cache_read_tokens=cached,
        reasoning_tokens=thoughts,
    )


def bedrock_converse(usage: Mapping[str, Any]) -> Usage:
    """AWS Bedrock Converse / ConverseStream ``usage``: ``inputTokens`` excludes
    ``cacheReadInputTokens`` and ``cacheWriteInputTokens`` (5-minute cache writes)."""
    where = BEDROCK
    _expect(usage, where, ("inputTokens", "outputTokens"), ("input_tokens", "prompt_tokens"))
    return Usage(
        usage_format=BEDROCK,
        input_tokens=_count(usage, "inputTokens", where, True),
        output_tokens=_count(usage, "outputTokens", where, True),
        cache_read_tokens=_count(usage, "cacheReadInputTokens", where),
        cache_write_tokens=_count(usage, "cacheWriteInputTokens", where),
    )


def litellm(usage: Mapping[str, Any]) -> Usage:
    """LiteLLM's normalised, OpenAI-shaped ``usage`` (any provider behind it).

    ``prompt_tokens`` includes cache reads *and* cache writes (LiteLLM folds Anthropic's
    separate counts in); reads are ``prompt_tokens_details.cached_tokens`` (or
    ``cache_read_input_tokens``), writes ``prompt_tokens_details.cache_creation_tokens`` (or
    ``cache_creation_input_tokens``), split by ``cache_creation_token_details`` when given.
    """
    where = LITELLM
    _expect(usage, where, ("prompt_tokens", "completion_tokens"), ("input_tokens",))
    details = _object(usage, "prompt_tokens_details", where)
    prompt = _count(usage, "prompt_tokens", where, True)
    completion = _count(usage, "completion_tokens", where, True)
    read = _first_count((details, "cached_tokens"), (usage, "cache_read_input_tokens"), where=where)
    written = _first_count(
        (details, "cache_creation_tokens"), (usage, "cache_creation_input_tokens"), where=where
    )
    split = _object(details, "cache_creation_token_details", where)
    if split and any(split.get(k) for k in ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")):
        w5 = _count(split, "ephemeral_5m_input_tokens", where)
        w1h = _count(split, "ephemeral_1h_input_tokens", where)
        if w5 + w1h != written:
            raise AdapterError(f"{where}: cache_creation_token_details add up to {w5 + w1h}, not {written}")
    else:
        w5, w1h = written, 0
    reasoning = _count(_object(usage, "completion_tokens_details", where), "reasoning_tokens", where)
    _check_total(usage, "total_tokens", prompt + completion, where)
    return Usage(
        usage_format=LITELLM,
        input_tokens=_part(prompt, read + written, where, "prompt_tokens", "cache reads + writes"),
        output_tokens=completion,
        cache_read_tokens=read,
        cache_write_tokens=w5,
        cache_write_1h_tokens=w1h,
        reasoning_tokens=reasoning,
    )


def _first_count(*candidates: tuple[Mapping[str, Any], str], where: str) -> int:
    """The first candidate that is present (LiteLLM mirrors some counts in two places)."""
    for block, key in candidates:
        if block.get(key) is not None:
            return _count(block, key, where)
    return 0


def _check_total(usage: Mapping[str, Any], key: str, expected: int, where: str) -> None:
    if usage.get(key) is not None and _count(usage, key, where) != expected:
        raise AdapterError(f"{where}: {key} is {usage[key]}, not the {expected} its parts add up to")


ADAPTERS: dict[str, Callable[[Mapping[str, Any]], Usage]] = {
    ANTHROPIC: anthropic_messages,
    OPENAI_CHAT: openai_chat,
    OPENAI_RESPONSES: openai_responses,
    GEMINI: gemini,
    BEDROCK: bedrock_converse,
    LITELLM: litellm,
}
FORMATS = tuple(ADAPTERS)
#: The provider value an event gets for each format (LiteLLM: the provider behind it is unknown here).
PROVIDERS = {
    ANTHROPIC: "anthropic",
    OPENAI_CHAT: "openai",
    OPENAI_RESPONSES: "openai",
    GEMINI: "google",
    BEDROCK: "aws-bedrock",
    LITELLM: None,
}


def to_usage(usage_format: str, block: Mapping[str, Any] | Usage) -> Usage:
    """Map a provider's usage block with the adapter of `usage_format` (one of FORMATS)."""
    if isinstance(block, Usage):
        raise AdapterError(f"usage already mapped from {block.usage_format}; map each block once")
    if not isinstance(block, Mapping):
        raise AdapterError(f"{usage_format}: the usage block must be a JSON object")
    if "usage_format" in block:
        raise AdapterError(f"usage already mapped from {block['usage_format']}; map each block once")
    adapter = ADAPTERS.get(usage_format)
    if adapter is None:
        raise AdapterError(f"unknown usage_format {usage_format!r}; expected one of {', '.join(FORMATS)}")
    return adapter(block)


_BEDROCK_MODEL = re.compile(
    r"^(?:[a-z]{2,6}\.)?(?:anthropic|amazon|meta|mistral|cohere|ai21|deepseek)\.(.+?)(?:-v\d+(?::\d+)?)?$"
)


def model_name(usage_format: str, model: str) -> str:
    """The catalog's model name for a provider's model string: Bedrock ids lose their
    region/vendor prefix and version suffix (``us.anthropic.claude-sonnet-4-5-20250929-v1:0``
    -> ``claude-sonnet-4-5-20250929``), Gemini's ``models/`` goes, LiteLLM's
    ``provider/`` prefix goes."""
    if usage_format == BEDROCK:
        match = _BEDROCK_MODEL.match(model)
        return match.group(1) if match else model
    if usage_format == GEMINI:
        return model.removeprefix("models/")
    if usage_format == LITELLM and "/" in model:
        return model.split("/", 1)[1]
    return model
