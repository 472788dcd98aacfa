"""The order of a turn's events, as CONTRACT.md ("A turn that streams as it happens") gives it,
checked event by event: `contract_problems(out)` is [] for a turn that follows it, else what is
wrong, where.

    USER message
    per model call: model_call, its text_deltas, the ASSISTANT message (id = the deltas'
        message_id, content = their concatenation without reasoning), its tool_calls, then
        tool_outputs (of those calls, before each one's result) and each call's tool_result
        followed by its TOOL message
    (a turn without a model: its one tool_call, outputs, tool_result and TOOL message)
    usage, then final_response, last
"""

from __future__ import annotations

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import session_pb2 as pb


def kinds(out: list[pb.TurnOutput]) -> list[str]:
    return [o.WhichOneof("event") for o in out]


def contract_problems(out: list[pb.TurnOutput], model: bool = True) -> list[str]:
    problems: list[str] = []
    events = [(o.WhichOneof("event"), o) for o in out]
    i = 0

    def at() -> str:
        return events[i][0] if i < len(events) else "(the end)"

    if at() != "message" or events[0][1].message.role != aria_pb2.USER:
        return [f"event 0 is {at()}, not the USER message"]
    i = 1
    while i < len(events) and at() in ("model_call", "tool_call"):
        if model:
            if at() != "model_call":
                return [*problems, f"event {i}: {at()} where a model_call should begin the model call"]
            i += 1
            message_id, text = None, []
            while at() == "text_delta":
                delta = events[i][1].text_delta
                if message_id is not None and delta.message_id != message_id:
                    problems.append(f"event {i}: a delta of another message ({delta.message_id})")
                message_id = delta.message_id
                if not delta.reasoning:
                    text.append(delta.text)
                i += 1
            if at() != "message" or events[i][1].message.role != aria_pb2.ASSISTANT:
                return [*problems, f"event {i}: {at()} where the ASSISTANT message should follow the deltas"]
            assistant = events[i][1].message
            if message_id is not None and assistant.id != message_id:
                problems.append(f"event {i}: the ASSISTANT message {assistant.id} is not the deltas' {message_id}")
            if text and "".join(text) != assistant.content:
                problems.append(f"event {i}: the deltas do not make the message's content")
            asked = [c.call_id for c in assistant.tool_calls]
            i += 1
        else:
            asked = None
        calls = []
        while at() == "tool_call":
            calls.append(events[i][1].tool_call.call_id)
            i += 1
        if asked is not None and calls != asked:
            problems.append(f"the tool_calls {calls} are not the ASSISTANT message's {asked}")
        pending = set(calls)
        while pending and at() in ("tool_output", "tool_result"):
            kind, o = events[i]
            if kind == "tool_output":
                if o.tool_output.call_id not in pending:
                    problems.append(f"event {i}: output of a call that is not running ({o.tool_output.call_id})")
                i += 1
                continue
            call_id = o.tool_result.call_id
            if call_id not in pending:
                problems.append(f"event {i}: a result of a call that is not running ({call_id})")
            pending.discard(call_id)
            i += 1
            tool = events[i][1].message if at() == "message" else None
            if tool is None or tool.role != aria_pb2.TOOL or tool.tool_call_id != call_id:
                return [*problems, f"event {i}: {at()} where the TOOL message of {call_id} should follow its result"]
            i += 1
        if pending:
            return [*problems, f"event {i}: {at()} while calls {sorted(pending)} have no result"]
        if not model:
            break
    if at() != "usage":
        return [*problems, f"event {i}: {at()} where usage should be"]
    i += 1
    if at() != "final_response":
        return [*problems, f"event {i}: {at()} where final_response should be"]
    if i != len(events) - 1:
        problems.append(f"final_response is event {i} of {len(events)}: not the last")
    return problems
