"""A LiteLLM custom callback that sends the usage of every successful call to meter, signed.

LiteLLM reports usage in its normalised, OpenAI-shaped form, where ``prompt_tokens``
already includes cache reads and cache writes; meter's ``litellm`` adapter splits them
back out, so nothing is counted twice (docs/adapters.md).

With the LiteLLM proxy, put this file beside its config as ``meter_callback.py`` and add:

    litellm_settings:
      callbacks: meter_callback.proxy_handler_instance

Settings come from the environment:

    METER_BROKERS      Kafka bootstrap servers (HOST:PORT[,...])
    METER_TOPIC        the usage topic (default "usage")
    METER_KID          the key id in meter's keyring
    METER_SECRET_REF   where the HMAC secret is: env:NAME or file:PATH
    METER_CLIENT       the client value events carry (a gateway-bound key checks it)

The callback never raises into LiteLLM: a usage block that cannot be mapped is logged and
skipped (and counted in ``skipped``), and producing only queues the message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from meter.adapters import LITELLM, AdapterError
from meter.keyring import loads_keyring
from meter.producer import UsageProducer, event_id_for
from meter.signing import HmacSigner

log = logging.getLogger("meter.litellm")


def _as_dict(value: Any) -> dict[str, Any]:
    """LiteLLM's objects are pydantic models or dicts."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    for method in ("model_dump", "dict"):
        if hasattr(value, method):
            return dict(getattr(value, method)())
    return dict(vars(value))


def producer_from_env(env: Mapping[str, str] = os.environ) -> UsageProducer:
    kid = env["METER_KID"]
    ring = loads_keyring(f'[[key]]\nkid = "{kid}"\nsecret_ref = "{env["METER_SECRET_REF"]}"\n', env=env)
    secret = ring.keys[0].secret
    assert secret is not None
    return UsageProducer(
        env["METER_BROKERS"],
        env.get("METER_TOPIC", "usage"),
        HmacSigner(kid, secret),
        client=env.get("METER_CLIENT", "litellm"),
    )


class MeterCallback(CustomLogger):  # type: ignore[misc]
    def __init__(self, producer: UsageProducer | None = None) -> None:
        super().__init__()
        self._producer = producer
        self.sent = 0
        self.skipped = 0

    @property
    def producer(self) -> UsageProducer:
        if self._producer is None:
            self._producer = producer_from_env()
        return self._producer

    def log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._send(kwargs, response_obj)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._send(kwargs, response_obj)

    def _send(self, kwargs: dict[str, Any], response_obj: Any) -> None:
        response = _as_dict(response_obj)
        usage = _as_dict(response.get("usage"))
        standard = _as_dict(kwargs.get("standard_logging_object"))
        metadata = _as_dict(standard.get("metadata")) or _as_dict(
            _as_dict(kwargs.get("litellm_params")).get("metadata")
        )
        user = (
            kwargs.get("user")
            or standard.get("end_user")
            or metadata.get("user_api_key_user_id")
            or metadata.get("user_api_key_alias")
            or "unknown"
        )
        request_id = str(response.get("id") or standard.get("id") or "")
        model = response.get("model") or kwargs.get("model")
        if not usage or not request_id or not model:
            self.skipped += 1
            log.warning("litellm call without usage, id or model: not metered")
            return
        try:
            self.producer.send_usage(
                LITELLM,
                usage,
                event_id=event_id_for(request_id),
                user=str(user),
                model=str(model),
                team=metadata.get("user_api_key_team_id") or None,
                org=metadata.get("user_api_key_org_id") or None,
                provider=kwargs.get("custom_llm_provider") or None,
                request_id=request_id if len(request_id.encode()) <= 128 else None,
            )
            self.sent += 1
        except (AdapterError, ValueError) as error:
            self.skipped += 1
            log.warning("litellm usage not metered: %s", error)


proxy_handler_instance = MeterCallback()
