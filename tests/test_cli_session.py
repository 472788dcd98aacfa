"""`aria session ...` and `aria chat`: the real CLI against the real daemon (and a scripted model)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

from cli_runner import run_aria
from test_cli_runtime import (
    Lines,
    aria,
    aria_env,
    as_json,
    close_lines,  # noqa: F401 (the fixture that closes each Lines: here too)
    fields,
    json_lines,
    ok,
)

from fake_llm import FakeLLM, Stream, chunk

ECHO_HI = '/run_command {"command": ["echo", "hi"]}'
HI_RESULT = '{"exit_code": 0, "stdout": "hi\\n", "stderr": ""}'
USAGE = re.compile(r"\(\d+ model calls?, \d+ tool calls?, (no token counts|\d+\+\d+ tokens), \d+\.\d s\)")


def chat(daemon, session, *args, stdin=None, json_output=False, timeout=60):
    """`aria [--json] chat SESSION ARGS...`, its stdin `stdin` (else empty). One turn (-m) runs
    in this process (see cli_runner); with lines on stdin (chat reads fd 0 itself) a process."""
    argv = [*(["--json"] if json_output else []), "chat", session, *args]
    if stdin is None and "-m" in args:
        return run_aria(*argv, socket=daemon.socket)
    return subprocess.run(
        [sys.executable, "-m", "aria_trio", *argv],
        input=stdin or "",
        capture_output=True,
        text=True,
        env=aria_env(daemon),
        timeout=timeout,
    )


def new_session(daemon, *args):
    return ok(daemon, "session", "new", *args).strip()


class Interactive(Lines):
    """`aria chat SESSION` with its stdin a pipe; stdout lines read on a thread."""

    def __init__(self, daemon, session):
        super().__init__(daemon, "chat", session, stdin=subprocess.PIPE)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def take(self, n, timeout=30.0):
        return super().take(n, timeout)

    def end_input(self):
        """End its input; its exit status and stderr."""
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=30)
        return rc, self.proc.stderr.read()


# -- help -----------------------------------------------------------------------------------------


# (their help is checked with the other verbs', in test_cli_runtime)


# -- sessions -------------------------------------------------------------------------------------


def test_session_new_show_list_end(daemon):
    first = new_session(daemon)
    second = new_session(daemon, "--agent", "default", "--context", "project=aria", "--context", "mood=good day")
    assert first.startswith("s-") and second.startswith("s-") and first != second

    shown = fields(ok(daemon, "session", "show", second))
    assert shown["id"] == second and shown["status"] == "active" and shown["agent"] == "default"
    assert shown["created"].startswith("20") and shown["context"] == "mood='good day' project=aria"
    detail = as_json(daemon, "session", "show", second)
    assert detail["context_data"] == {"project": "aria", "mood": "good day"} and detail["status"] == "active"

    listing = ok(daemon, "session", "list").splitlines()
    assert listing[0].split() == ["ID", "STATUS", "CREATED", "AGENT", "CONTEXT"]
    assert [line.split()[0] for line in listing[1:]] == [second, first]  # newest first
    one = aria(daemon, "session", "list", "--limit", "1")
    assert [line.split()[0] for line in one.stdout.splitlines()[1:]] == [second]
    assert "(more: --all, or --page-token " in one.stderr
    token = one.stderr.split("--page-token ")[1].rstrip(")\n")
    assert [s["id"] for s in as_json(daemon, "session", "list", "--limit", "1", "--page-token", token)] == [first]
    every = aria(daemon, "--json", "session", "list", "--limit", "1", "--all")
    assert [s["id"] for s in json.loads(every.stdout)] == [second, first] and every.stderr == ""

    assert ok(daemon, "session", "end", first).strip() == f"ended {first} (completed)"
    assert as_json(daemon, "session", "end", first)["status"] == "completed"  # again: nothing changes
    assert fields(ok(daemon, "session", "show", first))["status"] == "completed"
    refused = chat(daemon, first, "-m", ECHO_HI)
    assert refused.returncode == 1 and "(FAILED_PRECONDITION, request id " in refused.stderr

    for verb in ("show", "end", "history"):
        missing = aria(daemon, "session", verb, "s-nope")
        assert missing.returncode == 1 and "(NOT_FOUND, request id " in missing.stderr, verb
    nowhere = chat(daemon, "s-nope", "-m", ECHO_HI)
    assert nowhere.returncode == 1 and "(NOT_FOUND, request id " in nowhere.stderr and nowhere.stdout == ""
    assert aria(daemon, "session", "new", "--context", "novalue").returncode == 2
    unknown = aria(daemon, "session", "new", "--agent", "Nobody")
    assert unknown.returncode == 1 and "(NOT_FOUND" in unknown.stderr


# -- chat without a model: direct tool use --------------------------------------------------------


def test_chat_runs_a_tool_directly(module_daemon):
    session = new_session(module_daemon)
    out = chat(module_daemon, session, "-m", ECHO_HI)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        '→ run_command({"command": ["echo", "hi"]})',
        "  │ hi",  # what it printed, as it printed it
        f"✓ run_command: {HI_RESULT}",
        HI_RESULT,
    ]
    assert re.fullmatch(r"\(0 model calls, 1 tool call, no token counts, \d+\.\d s\)\n", out.stderr)  # no spinner

    failing = chat(module_daemon, session, "-m", '/run_command {"command": "not a list"}')
    assert failing.returncode == 0  # the turn ran: its tool call failed
    lines = failing.stdout.splitlines()
    assert lines[1].startswith("✗ run_command: invalid arguments") and lines[2].startswith("error: invalid arguments")


def test_chat_json_prints_the_events(module_daemon):
    session = new_session(module_daemon)
    out = chat(module_daemon, session, "-m", ECHO_HI, json_output=True)
    assert out.returncode == 0, out.stderr
    events = json_lines(out.stdout)
    assert [next(iter(e)) for e in events] == [
        *["message", "tool_call", "tool_output", "tool_result", "message", "usage", "final_response"]
    ]
    assert events[0]["message"]["role"] == "USER" and events[0]["message"]["content"] == ECHO_HI
    assert events[2]["tool_output"] == {"call_id": events[1]["tool_call"]["call_id"], "stdout_line": "hi"}
    assert events[3]["tool_result"]["success"] is True
    assert events[3]["tool_result"]["call_id"] == events[1]["tool_call"]["call_id"]
    assert events[5]["usage"]["tool_calls"] == 1
    assert events[6]["final_response"] == HI_RESULT


def test_chat_reads_piped_lines_and_goes_on_after_an_error(module_daemon):
    session = new_session(module_daemon)
    stdin = f'{ECHO_HI}\n\n/run_command {{"command": ["sh", "-c", "echo two"]}}\n'
    out = chat(module_daemon, session, stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("✓ run_command") == 2 and '"stdout": "two\\n"' in out.stdout.splitlines()[-1]

    # a plain line without a model: the hint, and the next line still runs; exit status 1
    out = chat(module_daemon, session, stdin=f"hello there\n{ECHO_HI}\n/quit\n{ECHO_HI}\n")
    assert out.returncode == 1
    assert out.stderr.startswith("error: no model is configured: set one with `aria prefs set llm.model NAME`")
    errors = [line for line in out.stderr.splitlines() if not USAGE.fullmatch(line)]
    assert "(FAILED_PRECONDITION, request id " in out.stderr and len(errors) == 1
    assert out.stdout.count("✓ run_command") == 1  # /quit ended it before the last line

    single = chat(module_daemon, session, "-m", "hello there")
    assert single.returncode == 1 and "llm.base_url" in single.stderr and single.stdout == ""

    history = ok(module_daemon, "session", "history", session).splitlines()
    assert history == [
        f"you: {ECHO_HI}",
        '→ run_command({"command": ["echo", "hi"]})',
        f"← run_command: {HI_RESULT}",
        'you: /run_command {"command": ["sh", "-c", "echo two"]}',
        '→ run_command({"command": ["sh", "-c", "echo two"]})',
        '← run_command: {"exit_code": 0, "stdout": "two\\n", "stderr": ""}',
        f"you: {ECHO_HI}",
        '→ run_command({"command": ["echo", "hi"]})',
        f"← run_command: {HI_RESULT}",
    ]  # the refused turns left nothing
    messages = as_json(module_daemon, "session", "history", session)
    assert [m["role"] for m in messages] == ["USER", "ASSISTANT", "TOOL"] * 3
    assert messages[1]["tool_calls"][0]["call_id"] == messages[2]["tool_call_id"]
    assert ok(module_daemon, "session", "history", new_session(module_daemon)).strip() == "(no messages)"


def test_history_reads_every_page(module_daemon):
    session = new_session(module_daemon)
    out = chat(
        module_daemon, session, stdin="".join(f'/run_command {{"command": ["echo", "{i}"]}}\n' for i in range(4))
    )
    assert out.returncode == 0, out.stderr
    whole = ok(module_daemon, "session", "history", session)
    assert len(whole.splitlines()) == 12
    assert ok(module_daemon, "session", "history", "--page-size", "5", session) == whole  # three pages
    assert as_json(module_daemon, "session", "history", "--page-size", "1", session) == as_json(
        module_daemon, "session", "history", session
    )


def test_ctrl_c_cancels_the_turn_and_the_prompt_goes_on(module_daemon):
    session = new_session(module_daemon)
    talk = Interactive(module_daemon, session)
    talk.send('/run_command {"command": ["sleep", "30"]}')
    assert talk.take(1) == ['→ run_command({"command": ["sleep", "30"]})']
    talk.proc.send_signal(signal.SIGINT)
    talk.send('/run_command {"command": ["echo", "after"]}')
    lines = talk.take(4)
    assert lines[1:3] == ["  │ after", '✓ run_command: {"exit_code": 0, "stdout": "after\\n", "stderr": ""}'], lines
    rc, err = talk.end_input()
    assert rc == 0 and err.splitlines()[0] == "(turn cancelled)" and USAGE.fullmatch(err.splitlines()[1]), err
    history = ok(module_daemon, "session", "history", session).splitlines()
    assert history[:2] == ['you: /run_command {"command": ["sleep", "30"]}', history[1]]
    assert history[-1] == '← run_command: {"exit_code": 0, "stdout": "after\\n", "stderr": ""}'


def test_ctrl_c_at_the_prompt_leaves(module_daemon):
    talk = Interactive(module_daemon, new_session(module_daemon))
    talk.send(ECHO_HI)
    assert len(talk.take(4)) == 4
    talk.proc.send_signal(signal.SIGINT)
    rc = talk.proc.wait(timeout=10)
    assert rc == 0 and "Traceback" not in talk.proc.stderr.read()


# -- chat with a model ----------------------------------------------------------------------------


def test_chat_with_a_scripted_model(daemon):
    with FakeLLM() as llm:
        ok(daemon, "prefs", "set", "llm.base_url", llm.base_url)
        ok(daemon, "prefs", "set", "llm.model", "fake-model")
        llm.call_tools([("run_command", {"command": ["echo", "hi"]})], text="Let me run it.")
        llm.reply_text("It printed hi.")
        session = new_session(daemon)
        out = chat(daemon, session, "-m", "say hi in a shell")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "Let me run it.",  # (written as it streamed)
            '→ run_command({"command": ["echo", "hi"]})',
            "  │ hi",
            f"✓ run_command: {HI_RESULT}",
            "It printed hi.",  # the final answer, once
        ]
        assert USAGE.fullmatch(out.stderr.strip()) and out.stderr.startswith("(2 model calls, 1 tool call")
        assert len(llm.requests) == 2
        sent = llm.requests[1].body["messages"]
        assert sent[-1]["role"] == "tool" and json.loads(sent[-1]["content"])["stdout"] == "hi\n"

    history = ok(daemon, "session", "history", session).splitlines()
    assert [line for line in history if not re.fullmatch(r"  \(no token counts, \d+\.\d s\)", line)] == [
        "you: say hi in a shell",
        "assistant: Let me run it.",
        '→ run_command({"command": ["echo", "hi"]})',
        f"← run_command: {HI_RESULT}",
        "assistant: It printed hi.",
    ]
    assert len(history) == 7  # each model call's usage under its reply


def test_chat_shows_the_reasoning_apart_or_hides_it(daemon):
    """The model's reasoning is written before its answer (dimmed on a terminal), on a line of its
    own; --no-reasoning leaves it out; the answer is the same either way."""
    thinking = [
        chunk({"role": "assistant", "reasoning_content": "Greeting; "}),
        chunk({"reasoning_content": "be short."}),
    ]
    answer = [chunk({"content": "Hello"}), chunk({"content": " there."}, "stop")]
    with FakeLLM() as llm:
        ok(daemon, "prefs", "set", "llm.base_url", llm.base_url)
        ok(daemon, "prefs", "set", "llm.model", "fake-model")
        llm.push(Stream(thinking + answer, interval=0.05))
        llm.push(Stream(thinking + answer, interval=0.05))
        session = new_session(daemon)
        shown = chat(daemon, session, "-m", "hi")
        hidden = chat(daemon, session, "--no-reasoning", "-m", "hi again")
    assert shown.returncode == 0 and hidden.returncode == 0, (shown.stderr, hidden.stderr)
    assert shown.stdout.splitlines() == ["Greeting; be short.", "Hello there."]
    assert hidden.stdout.splitlines() == ["Hello there."]
