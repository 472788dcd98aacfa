"""The model provider: OpenAI-compatible Chat Completions, streamed, with tool calling.

One protocol reaches OpenAI, Ollama, vLLM, llama.cpp's server and LM Studio, so the runtime speaks
only it: POST {base_url}/chat/completions with `stream: true`, read the server-sent events, and
assemble the text and the tool calls from their fragments. A server that ignores `stream` and
answers one JSON completion is accepted too.

Failures are domain errors a client can act on: the server cannot be reached, is overloaded or too
slow (UNAVAILABLE, after retries with backoff); it refuses the request (FAILED_PRECONDITION: a bad
key, an unknown model). Retries happen only while nothing has been shown to the caller: a reply
half streamed is never replayed. The API key is never put in a message or a log line.

Modules: `config` (which server, model and key a user gets), `client` (ChatModel: the request, its
retries, the log line), `transport` (the HTTP answer: status, errors, Retry-After, its kind),
`stream` (server-sent events, bounded), `reply` (the reply assembled from the chunks), `chunks`
(the wire shapes), `call` (what one call's attempts share, and how its failures read).
"""

from aria_trio.runtime.agents.llm.client import ChatModel
from aria_trio.runtime.agents.llm.config import OPENAI_BASE_URL, LLMConfig, resolve_config
from aria_trio.runtime.agents.llm.reply import Reply, ToolCall

__all__ = ["OPENAI_BASE_URL", "ChatModel", "LLMConfig", "Reply", "ToolCall", "resolve_config"]
