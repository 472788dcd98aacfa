"""Which model server, model and key a user's calls go to: their preferences, else the operator's
environment; and the operator's key never goes to a URL the operator did not choose."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call the model.

    `timeout` bounds each attempt until the server starts answering (connecting, sending, waiting for
    the response headers; a server that does not stream answers only when it is done). After that,
    the stream may stay silent at most min(CHUNK_TIMEOUT, timeout) seconds at a time, however long
    the whole reply takes.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float | None = None
    system_prompt: str | None = None
    timeout: float = 120.0
    max_retries: int = 3


def resolve_config(prefs: Mapping[str, object], env: Mapping[str, str]) -> LLMConfig | None:
    """The model configuration of one user: their preferences (llm.base_url, llm.model,
    llm.temperature, llm.system_prompt, llm.api_key), else the daemon's environment
    (ARIA_LLM_BASE_URL, ARIA_LLM_MODEL, ARIA_LLM_API_KEY, else OPENAI_BASE_URL, OPENAI_API_KEY).
    The base URL defaults to OpenAI's only when OPENAI_API_KEY is the key configured. None when no
    model is configured (no model name, or no base URL).

    The operator's key (from the environment) is sent only to the operator's URL: a user who points
    llm.base_url elsewhere must give their own llm.api_key, so that no user can collect it.
    """

    def pref(key: str) -> str | None:
        value = prefs.get(key)
        return (value.strip() or None) if isinstance(value, str) else None

    def var(name: str) -> str | None:
        return env.get(name, "").strip() or None

    env_key = var("ARIA_LLM_API_KEY") or var("OPENAI_API_KEY")
    env_url = var("ARIA_LLM_BASE_URL") or var("OPENAI_BASE_URL")
    if env_url is None and var("ARIA_LLM_API_KEY") is None and var("OPENAI_API_KEY") is not None:
        env_url = OPENAI_BASE_URL
    user_url = pref("llm.base_url")
    base_url = user_url or env_url
    model = pref("llm.model") or var("ARIA_LLM_MODEL")
    if base_url is None or model is None:
        return None
    api_key = pref("llm.api_key")
    if api_key is None and (user_url is None or _same_url(user_url, env_url)):
        api_key = env_key
    temperature = prefs.get("llm.temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(temperature):
        temperature = None
    system_prompt = prefs.get("llm.system_prompt")
    return LLMConfig(
        base_url=base_url,
        model=model,
        api_key=api_key,
        temperature=None if temperature is None else float(temperature),
        system_prompt=system_prompt if isinstance(system_prompt, str) and system_prompt.strip() else None,
    )


def _same_url(a: str, b: str | None) -> bool:
    return b is not None and a.rstrip("/") == b.rstrip("/")
