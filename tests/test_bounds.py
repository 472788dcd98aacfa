"""Memory per call is bounded by bytes, not rows: pages of big messages, replays of long lines,
and the history sent to the model."""

from __future__ import annotations

import json

from test_turns_direct import messages, turn
from test_turns_model import use_model

from aria_trio.proto.aria.v1 import aria_pb2

from aria_client import AriaClient
from fake_llm import FakeLLM

BIG = 1_000_000  # bytes of each big message (a turn's input may be up to 1 MiB)


def test_big_messages_come_a_few_per_page_and_the_model_gets_what_fits(daemon):
    c = AriaClient(daemon.channel())
    session = c.session()
    for i in range(6):  # six turns of ~1 MB each (the direct tool path: no model needed)
        turn(c, session.id, f"/run_command {i:02d}" + "x" * BIG)
    seen, token, pages = [], "", 0
    while True:
        page = messages(c, session.id, page_size=1000, page_token=token)
        assert page.ByteSize() < 3 * 1024 * 1024  # well under a gRPC message (4 MiB)
        seen += [m.id for m in page.messages]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    every = [m.id for m in messages(c, session.id, page_size=1000).messages]
    assert pages >= 3 and len(seen) == len(set(seen)) == 6 * 3  # user, assistant, tool: once each
    assert seen[: len(every)] == every

    with FakeLLM() as llm:
        use_model(c, llm.base_url)
        llm.reply_text("ok")
        out = turn(c, session.id, "what now?")
        assert out[-1].final_response == "ok"
        sent = llm.requests[0].body["messages"]
        assert len(json.dumps(sent)) < 2.5 * 1024 * 1024  # the newest that fit in HISTORY_BYTES
        assert sent[-1] == {"role": "user", "content": "what now?"}
        assert sent[0]["role"] != "tool"  # a cut history never starts with a result of a cut call


def test_a_replay_of_long_lines_comes_in_bounded_batches(daemon):
    c = AriaClient(daemon.channel())
    line = "y" * 60_000  # under Quilt's longest line (64 KiB); 200 of them: 12 MB
    task_id = c.launch(["python3", "-c", f"print(('{line}' + chr(10)) * 200, end='')"])
    assert c.wait_task(task_id).status == aria_pb2.COMPLETED
    got = [o.stdout_line for o in c.output(task_id)]
    assert len(got) == 200 and set(got) == {line}
