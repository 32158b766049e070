"""Provider adapters: for each provider a response shaped like its documentation's example
maps to the exact buckets, and the cost meter computes for it (parse + catalog) equals the
provider's own price arithmetic (list prices per million tokens, written out here)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from meter import adapters as A
from meter.parser import parse_batch
from meter.pricing import load_catalog
from meter.producer import build_event, response_parts

CATALOG = load_catalog()
TS = 1_764_000_000_000  # 2025-11-24T16:00:00Z: inside every price entry used below
M = Decimal(1_000_000)

# Each case: format, response body, model name the catalog knows, expected buckets, and the
# provider's published per-million prices for that model as (bucket, USD) pairs.
CASES: list[tuple[str, dict[str, Any], str, dict[str, int], dict[str, str]]] = [
    (
        # Anthropic Messages API, prompt caching with a 1-hour and a 5-minute breakpoint.
        A.ANTHROPIC,
        {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "model": "claude-sonnet-4-5-20250929",
            "usage": {
                "input_tokens": 2095,
                "cache_read_input_tokens": 1800,
                "cache_creation_input_tokens": 248,
                "cache_creation": {"ephemeral_5m_input_tokens": 148, "ephemeral_1h_input_tokens": 100},
                "output_tokens": 503,
            },
        },
        "claude-sonnet-4-5-20250929",
        {
            "input_tokens": 2095,
            "output_tokens": 503,
            "cache_read_tokens": 1800,
            "cache_write_tokens": 148,
            "cache_write_1h_tokens": 100,
            "reasoning_tokens": 0,
        },
        {
            "input_tokens": "3",
            "output_tokens": "15",
            "cache_read_tokens": "0.30",
            "cache_write_tokens": "3.75",
            "cache_write_1h_tokens": "6",
        },
    ),
    (
        # OpenAI Chat Completions, prompt caching guide: cached tokens inside prompt_tokens.
        A.OPENAI_CHAT,
        {
            "id": "chatcmpl-abc123",
            "object": "chat.completion",
            "model": "gpt-4o-2024-08-06",
            "usage": {
                "prompt_tokens": 2006,
                "completion_tokens": 300,
                "total_tokens": 2306,
                "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
        },
        "gpt-4o-2024-08-06",
        {
            "input_tokens": 86,
            "output_tokens": 300,
            "cache_read_tokens": 1920,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "reasoning_tokens": 0,
        },
        {"input_tokens": "2.50", "output_tokens": "10", "cache_read_tokens": "1.25"},
    ),
    (
        # OpenAI Responses API, reasoning guide: reasoning tokens inside output_tokens.
        A.OPENAI_RESPONSES,
        {
            "id": "resp_67ccd2bed1ec8190b14f964abc054267",
            "object": "response",
            "model": "o4-mini-2025-04-16",
            "usage": {
                "input_tokens": 75,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 1186,
                "output_tokens_details": {"reasoning_tokens": 1024},
                "total_tokens": 1261,
            },
        },
        "o4-mini-2025-04-16",
        {
            "input_tokens": 75,
            "output_tokens": 1186,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "reasoning_tokens": 1024,
        },
        {"input_tokens": "1.10", "output_tokens": "4.40", "cache_read_tokens": "0.275"},
    ),
    (
        # Gemini generateContent with context caching and thinking.
        A.GEMINI,
        {
            "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
            "modelVersion": "gemini-2.5-flash",
            "usageMetadata": {
                "promptTokenCount": 12000,
                "cachedContentTokenCount": 10000,
                "candidatesTokenCount": 350,
                "thoughtsTokenCount": 1200,
                "totalTokenCount": 13550,
            },
        },
        "gemini-2.5-flash",
        {
            "input_tokens": 2000,
            "output_tokens": 1550,
            "cache_read_tokens": 10000,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "reasoning_tokens": 1200,
        },
        {"input_tokens": "0.30", "output_tokens": "2.50", "cache_read_tokens": "0.03"},
    ),
    (
        # AWS Bedrock Converse with prompt caching (global cross-region inference profile).
        A.BEDROCK,
        {
            "output": {"message": {"role": "assistant", "content": [{"text": "..."}]}},
            "stopReason": "end_turn",
            "usage": {
                "inputTokens": 30,
                "outputTokens": 628,
                "cacheReadInputTokens": 4000,
                "cacheWriteInputTokens": 1200,
                "totalTokens": 5858,
            },
            "metrics": {"latencyMs": 1275},
            "ResponseMetadata": {"RequestId": "5d5c3b0c-8f0a-4f51-9b0e-3f1d7b1f9e44"},
        },
        "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
        {
            "input_tokens": 30,
            "output_tokens": 628,
            "cache_read_tokens": 4000,
            "cache_write_tokens": 1200,
            "cache_write_1h_tokens": 0,
            "reasoning_tokens": 0,
        },
        {
            "input_tokens": "3",
            "output_tokens": "15",
            "cache_read_tokens": "0.30",
            "cache_write_tokens": "3.75",
        },
    ),
    (
        # LiteLLM's normalised usage for a Claude call (the shape of LiteLLM issue #11364):
        # prompt_tokens holds uncached input + cache reads + cache writes.
        A.LITELLM,
        {
            "id": "chatcmpl-7d9c3d70-1b1f-4c55-a7b6-2a5c0f6a0d2b",
            "model": "claude-opus-4-5-20251101",
            "usage": {
                "total_tokens": 103925,
                "prompt_tokens": 98805,
                "completion_tokens": 5120,
                "prompt_tokens_details": {"cached_tokens": 66360, "cache_creation_tokens": 32435},
                "cache_read_input_tokens": 66360,
                "cache_creation_input_tokens": 32435,
                "completion_tokens_details": {"reasoning_tokens": 1710},
            },
        },
        "claude-opus-4-5-20251101",
        {
            "input_tokens": 10,
            "output_tokens": 5120,
            "cache_read_tokens": 66360,
            "cache_write_tokens": 32435,
            "cache_write_1h_tokens": 0,
            "reasoning_tokens": 1710,
        },
        {
            "input_tokens": "5",
            "output_tokens": "25",
            "cache_read_tokens": "0.50",
            "cache_write_tokens": "6.25",
        },
    ),
]


def meter_cost(event: dict[str, Any]) -> Decimal:
    result = parse_batch([orjson.dumps(event)], now_ms=TS + 60_000)
    assert not result.rejects, result.rejects
    priced = CATALOG.price(result.batch)
    [cost] = priced.column("cost_usd").to_pylist()
    assert cost is not None, f"{event['model']} is not priced"
    return cost


@pytest.mark.parametrize(("fmt", "response", "model", "buckets", "prices"), CASES, ids=[c[0] for c in CASES])
def test_documented_payload_maps_exactly_and_costs_what_the_provider_bills(
    fmt: str, response: dict[str, Any], model: str, buckets: dict[str, int], prices: dict[str, str]
) -> None:
    usage_block, found_model, request_id = response_parts(fmt, response)
    usage = A.to_usage(fmt, usage_block)
    assert usage.usage_format == fmt
    assert usage.buckets() == buckets
    name = A.model_name(fmt, found_model or model)
    assert CATALOG.resolve(name) is not None, name
    event = build_event(usage, event_id="ev-1", user="u-1", model=name, ts_ms=TS, request_id=request_id)
    provider_arithmetic = sum((Decimal(buckets[b]) * Decimal(p) for b, p in prices.items()), Decimal(0)) / M
    assert meter_cost(event) == provider_arithmetic


def test_worked_costs() -> None:
    """The sums above, written out once so a reader can check them by hand."""
    expected = {
        A.ANTHROPIC: "0.015525",  # 2095*3 + 503*15 + 1800*0.30 + 148*3.75 + 100*6
        A.OPENAI_CHAT: "0.005615",  # 86*2.50 + 1920*1.25 + 300*10
        A.OPENAI_RESPONSES: "0.0053009",  # 75*1.10 + 1186*4.40 (1024 reasoning tokens inside)
        A.GEMINI: "0.004775",  # 2000*0.30 + 10000*0.03 + (350 + 1200)*2.50
        A.BEDROCK: "0.01521",  # 30*3 + 628*15 + 4000*0.30 + 1200*3.75
        A.LITELLM: "0.36394875",  # 10*5 + 66360*0.50 + 32435*6.25 + 5120*25
    }
    for fmt, response, model, _, _ in CASES:
        usage_block, found_model, _ = response_parts(fmt, response)
        event = build_event(
            A.to_usage(fmt, usage_block),
            event_id="e",
            user="u",
            model=A.model_name(fmt, found_model or model),
            ts_ms=TS,
        )
        assert meter_cost(event) == Decimal(expected[fmt]), fmt


def test_anthropic_stream_usage_is_cumulative_not_summed() -> None:
    events = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "model": "claude-haiku-4-5",
                "usage": {
                    "input_tokens": 472,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 1024,
                    "output_tokens": 2,
                },
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 89}},
        {"type": "message_stop"},
    ]
    usage = A.anthropic_stream(events)
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (472, 1024, 89)
    with pytest.raises(A.AdapterError, match="no message_start"):
        A.anthropic_stream(events[2:])


def test_anthropic_without_split_is_all_five_minute_writes() -> None:
    usage = A.anthropic_messages(
        {
            "input_tokens": 3,
            "cache_creation_input_tokens": 12304,
            "cache_read_input_tokens": 0,
            "output_tokens": 550,
        }
    )
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (3, 12304, 0)


def test_gemini_snake_case_and_tool_prompts() -> None:
    usage = A.gemini(
        {
            "prompt_token_count": 100,
            "cached_content_token_count": 40,
            "tool_use_prompt_token_count": 7,
            "candidates_token_count": 5,
        }
    )
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (67, 40, 5)


def test_litellm_openai_backed_and_split_writes() -> None:
    usage = A.litellm(
        {
            "prompt_tokens": 2006,
            "completion_tokens": 300,
            "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920},
        }
    )
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (86, 1920, 0)
    usage = A.litellm(
        {
            "prompt_tokens": 130,
            "completion_tokens": 25,
            "prompt_tokens_details": {
                "cached_tokens": 20,
                "cache_creation_tokens": 10,
                "cache_creation_token_details": {
                    "ephemeral_5m_input_tokens": 7,
                    "ephemeral_1h_input_tokens": 3,
                },
            },
        }
    )
    assert usage.buckets() == {
        "input_tokens": 100,
        "output_tokens": 25,
        "cache_read_tokens": 20,
        "cache_write_tokens": 7,
        "cache_write_1h_tokens": 3,
        "reasoning_tokens": 0,
    }


@pytest.mark.parametrize(
    ("fmt", "block", "message"),
    [
        (A.OPENAI_CHAT, {"input_tokens": 1, "output_tokens": 2}, "prompt_tokens is missing"),
        (A.ANTHROPIC, {"prompt_tokens": 1, "completion_tokens": 2}, "input_tokens is missing"),
        (
            A.OPENAI_CHAT,
            {"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 11}},
            "cached_tokens (11) exceeds prompt_tokens (10)",
        ),
        (
            A.OPENAI_CHAT,
            {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 12},
            "total_tokens is 12",
        ),
        (A.ANTHROPIC, {"input_tokens": 1.0, "output_tokens": 2}, "must be an integer"),
        (A.ANTHROPIC, {"input_tokens": True, "output_tokens": 2}, "must be an integer"),
        (A.ANTHROPIC, {"input_tokens": -1, "output_tokens": 2}, "negative"),
        (
            A.ANTHROPIC,
            {
                "input_tokens": 1,
                "output_tokens": 2,
                "cache_creation_input_tokens": 5,
                "cache_creation": {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 1},
            },
            "splits into 1 + 1",
        ),
        (
            A.OPENAI_RESPONSES,
            {"input_tokens": 1, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 3}},
            "reasoning tokens exceed output",
        ),
        (
            A.LITELLM,
            {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "cache_read_input_tokens": 4,
                "cache_creation_input_tokens": 2,
            },
            "exceeds prompt_tokens",
        ),
        ("nope", {}, "unknown usage_format"),
    ],
)
def test_bad_blocks_are_refused(fmt: str, block: dict[str, Any], message: str) -> None:
    with pytest.raises(
        A.AdapterError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
    ):
        A.to_usage(fmt, block)


def test_a_block_is_never_mapped_twice() -> None:
    usage = A.to_usage(A.OPENAI_CHAT, {"prompt_tokens": 10, "completion_tokens": 1})
    with pytest.raises(A.AdapterError, match=r"already mapped from openai\.chat"):
        A.to_usage(A.OPENAI_CHAT, usage)  # type: ignore[arg-type]
    with pytest.raises(A.AdapterError, match=r"already mapped from openai\.chat"):
        A.to_usage(A.LITELLM, usage.to_dict())


def test_model_names() -> None:
    assert (
        A.model_name(A.BEDROCK, "us.anthropic.claude-sonnet-4-5-20250929-v1:0")
        == "claude-sonnet-4-5-20250929"
    )
    assert A.model_name(A.BEDROCK, "anthropic.claude-3-haiku-20240307-v1:0") == "claude-3-haiku-20240307"
    assert A.model_name(A.GEMINI, "models/gemini-2.5-pro") == "gemini-2.5-pro"
    assert A.model_name(A.LITELLM, "anthropic/claude-haiku-4-5") == "claude-haiku-4-5"
    assert A.model_name(A.OPENAI_CHAT, "gpt-5") == "gpt-5"
