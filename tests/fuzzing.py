"""A seeded fuzzer for the daemons' gRPC APIs and their HTTP/2 layer (used by test_fuzz.py).

Message fuzzing (`Fuzzer`): the methods come from the daemon's own reflection service (every
service it lists, its descriptors as it serves them), so a method added to a daemon is fuzzed
without a change here. Each call's request is one of:

* `bytes`: random bytes as the payload (often not a valid message at all);
* `empty`: the default message;
* `valid`: a plausible message (ids the daemon handed out earlier, commands that end at once);
* `mutated`: a valid message with one to three fields set to extremes (huge, empty, unicode, NUL
  bytes; numbers at and past their bounds, NaN and infinities; thousands of repeated entries;
  maps with odd keys);
* `json`: a valid message whose JSON-carrying fields (names ending in `_json`, commands, a
  turn's `/tool <arguments>` input, preference values, bundle manifests) hold invalid JSON, JSON
  of the wrong type, or JSON nested 100,000 deep;
* `wire`: a valid message's encoding damaged below protobuf: invalid UTF-8 in a string field,
  varints that never end or overflow, lengths past the end, groups, field number 0, Struct values
  nested past any parser's depth.

Every request is derived from `random.Random(f"{seed}:{path}:{round}")`, so the same seed makes
the same requests in the same order, whatever the daemon answers (ids the daemon hands out are
drawn by index from what it has answered so far). A call's outcome is recorded with its request
id (the `x-request-id` trailer), which ties the daemon's log lines to the request that caused them.

HTTP/2 fuzzing (`RawH2`): a raw socket speaking bytes and hand-made frames to the daemon.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import random
import socket
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2 as refl

REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# -- outcomes ---------------------------------------------------------------------------------------

OK = grpc.StatusCode.OK
# What bad input may honestly get. Anything else (INTERNAL, UNKNOWN, UNAVAILABLE, DATA_LOSS, ...) is a
# failure. DEADLINE_EXCEEDED only for calls that wait by design (see Route.waits); CANCELLED only
# when we cancelled a stream ourselves after reading enough of it.
ACCEPTED = {
    grpc.StatusCode.INVALID_ARGUMENT: "bad input",
    grpc.StatusCode.NOT_FOUND: "an id that names nothing (random or another's)",
    grpc.StatusCode.FAILED_PRECONDITION: "a real resource in the wrong state (e.g. exec in a stopped container)",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "a message over the size limit, or a quota reached",
    grpc.StatusCode.PERMISSION_DENIED: "a garbage authorization header, or an admin-only request",
    grpc.StatusCode.UNIMPLEMENTED: "a method the server lists but has not built (reason NOT_IMPLEMENTED_YET)",
    grpc.StatusCode.ALREADY_EXISTS: "a name that must be unique, used twice",
    grpc.StatusCode.OUT_OF_RANGE: "a position past the end (offsets, pages)",
}
# UNAVAILABLE is honest when an upstream the caller chose failed: the model server (ErrorInfo
# reasons LLM_*). Not for Quilt: a Quilt failure caused by the caller's input is a bug.
UPSTREAM_REASONS = ("LLM_",)
# Substrings an error message must never carry (errors.py: no paths, SQL or tracebacks).
LEAKS = ("Traceback", 'File "', "sqlite3.", "site-packages", "/aria_trio/", '.py", line')


@dataclasses.dataclass(frozen=True)
class Route:
    path: str
    service: str
    name: str
    request: Any  # message class
    response: Any
    client_streaming: bool
    server_streaming: bool

    @property
    def descriptor(self) -> Descriptor:
        return self.request.DESCRIPTOR  # type: ignore[no-any-return]

    def waits(self, request: Message | None) -> bool:
        """Does this call wait by design, so that our deadline may end it? Wait*/Watch*/Attach methods,
        subscriptions (a stream of events that never ends by itself), and requests that ask to
        wait or follow. Any other call must end by itself within the unary deadline."""
        if self.name.startswith(("Wait", "Watch", "Subscribe", "Attach")) or (
            self.server_streaming and "Notification" in self.name
        ):
            return True
        if request is None:
            return False
        for flag in ("wait", "follow"):
            if flag in self.descriptor.fields_by_name and getattr(request, flag, False) is True:
                return True
        return False


@dataclasses.dataclass
class Outcome:
    route: Route
    round: int
    strategy: str
    what: str  # how the request was made, in words
    payloads: list[bytes]  # the request message(s), serialized (what was sent)
    code: grpc.StatusCode = OK
    message: str = ""
    request_id: str = ""
    reason: str = ""
    details_ok: bool = True  # a google.rpc.Status with ErrorInfo (and BadRequest for INVALID_ARGUMENT)
    responses: int = 0
    seconds: float = 0.0
    cancelled_by_us: bool = False
    problem: str = ""  # set when this outcome is a failure
    ended: float = 0.0  # time.monotonic() when it ended

    def describe(self, seed: int, limit: int = 600) -> str:
        sizes = ", ".join(str(len(p)) for p in self.payloads[:8])
        head = self.payloads[0][:limit] if self.payloads else b""
        more = "" if not self.payloads or len(self.payloads[0]) <= limit else f" ... ({len(self.payloads[0])} bytes)"
        return (
            f"{self.route.path} seed={seed} round={self.round} strategy={self.strategy}\n"
            f"  request: {self.what}\n"
            f"  payload sizes: [{sizes}]{' ...' if len(self.payloads) > 8 else ''}; first (base64): "
            f"{base64.b64encode(head).decode()}{more}\n"
            f"  -> {self.code.name} {self.message[:300]!r} reason={self.reason} request_id={self.request_id} "
            f"after {self.seconds:.2f}s"
        )


# -- protobuf wire encoding, by hand (for what the protobuf library will not write) --------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


def nested_value(depth: int) -> bytes:
    """A google.protobuf.Value holding a list holding a list ... `depth` deep, as bytes, built in
    O(depth) (Value.list_value = 6, ListValue.values = 1)."""
    # innermost: an empty Value; each level: Value{list_value: ListValue{values: [inner]}}
    sizes = [0]
    for _ in range(depth):
        inner = sizes[-1]
        list_value = 1 + len(varint(inner)) + inner  # ListValue{values(1): inner}
        sizes.append(1 + len(varint(list_value)) + list_value)  # Value{list_value(6): ...}
    parts = []
    for level in range(depth, 0, -1):
        inner = sizes[level - 1]
        list_value = 1 + len(varint(inner)) + inner
        parts.append(tag(6, 2) + varint(list_value) + tag(1, 2) + varint(inner))
    return b"".join(parts)


# -- value pools ----------------------------------------------------------------------------------------

DEEP = 100_000
QUICK_COMMANDS = [["true"], ["false"], ["echo", "fuzz"], ["sh", "-c", "exit 3"], ["printf", "%s\\n", "a", "b"]]
ODD_STRINGS = [
    "",
    " ",
    "\0",
    "a\0b",
    "\0" * 64,
    "é",
    "日本語",
    "\U0001f600",
    "\u202e\u0645\u0631\u062d\u0628\u0627",  # RTL override, Arabic
    "\ufeff",
    "\u200b",
    "\ufffd",
    "\r\n",
    "\n" * 10,
    "\t",
    "%s%n%x{}{0}",
    "' OR 1=1 --",
    "'; DROP TABLE tasks; --",
    '"',
    "\\",
    "../../../../etc/passwd",
    "/",
    ".",
    "..",
    "/dev/zero",
    "/proc/self/mem",
    "~root",
    "$(id)",
    "`id`",
    "*",
    "?",
    "-1",
    "0",
    "9" * 40,
    "NaN",
    "null",
    "true",
    "container:run",
    "container:exec:",
    "container:exec:nope",
    "container:exec:" + "x" * 300,
    "host",
    "http://127.0.0.1:9/",
    "A" * 256,
    "A" * 257,
    "B" * 4096,
]
HUGE_SIZES = [64 * 1024, 1024 * 1024, 4 * 1024 * 1024 - 64, 4 * 1024 * 1024 + 1]
BAD_JSON = [
    "",
    " ",
    "{",
    "[",
    "]",
    "[1,",
    '{"a":}',
    '{"a" 1}',
    "nul",
    "tru",
    "NaN",
    "Infinity",
    "-Infinity",
    "[NaN]",
    "[Infinity]",
    "1e999999",
    "-1e999999",
    '"\\ud800"',
    '["\\ud800"]',
    '["\\u0000"]',
    "'single'",
    "{'a': 1}",
    "[] []",
    "\0",
    "\ufeff[]",
    '["a",]',
    '{"a":1,}',
    "// comment\n[]",
    "[" * 5000 + "]" * 5000,  # past Python's recursion limit, within every size limit
    '{"a":' * 5000 + "1" + "}" * 5000,
    "[" * DEEP + "]" * DEEP,  # the brief's 100,000 deep
    '{"a":' * DEEP + "1" + "}" * DEEP,
    "[" * DEEP,  # unclosed
    "1" * 100_000,  # a 100,000-digit integer (Python's int-from-string limit is 4300 digits)
    "9" * 5000,
    "0." + "1" * 5000,
    '"' + "a" * 1_000_000 + '"',
]
DEEP_JSON = [j for j in BAD_JSON if j.startswith(("[[", '{"a":{'))] + ['{"command": ' + "[" * 5000 + "]" * 5000 + "}"]
WRONG_JSON = [
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1.5",
    '"text"',
    "[]",
    "{}",
    "[1, 2]",
    '[["true"]]',
    "[null]",
    "[true]",
    '[""]',
    '["", "x"]',
    '["a\\u0000b"]',
    '{"command": "true"}',
    '{"command": ["true"], "timeout_seconds": -1}',
    '{"command": ["true"], "timeout_seconds": 1e400}',
    '{"command": [], "extra": 1}',
    '{"command": [1, 2]}',
    '{"command": ["true"], "environment": {"A": 1}}',
    '{"command": ["true"], "environment": {"": "x", "A=B": "c"}}',
    '{"a": "x", "b": "y"}',
    '{"a": 1e308, "b": 1e308}',
    '{"text": null}',
    '{"__proto__": {}}',
    '["\\ud800"]',  # a lone surrogate: valid JSON, but no str with it can be encoded (protobuf, UTF-8)
    '{"command": ["\\udfff"]}',
    '{"command": ["true"], "environment": {"A": "\\ud800"}}',
    '{"command": ["sh", "-c", "exit 0", "\\ud83d"]}',
    "[" + ",".join(['"x"'] * 10_000) + "]",
    '["true", ' + ",".join(['"a"'] * 5000) + "]",
    json.dumps({f"k{i}": i for i in range(10_000)}),
]


def bad_manifests() -> list[bytes]:
    return [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"manifest"',
        b"\xff\xfe\x00{}",
        (b"[" * DEEP) + (b"]" * DEEP),
        b'{"name": ' * 5000 + b"1" + b"}" * 5000,
        json.dumps({"name": 1, "version": [], "tools": "x", "agents": {}}).encode(),
        json.dumps({"name": "x", "version": "1", "tools": [{"name": None, "inputs": "?"}]}).encode(),
        json.dumps({"name": "x", "version": "1", "tools": [{"name": "t", "inputs": {"a": {"$ref": "#"}}}]}).encode(),
        json.dumps({"name": "x" * 100_000, "version": "1", "tools": [], "agents": []}).encode(),
        json.dumps(
            {
                "name": "x",
                "version": "1",
                "tools": [],
                "agents": [{"name": "a", "tools": ["nope"], "max_iterations": -1}],
            }
        ).encode(),
        json.dumps({"name": "x", "version": "1", "tools": [{"name": f"t{i}"} for i in range(5000)]}).encode(),
        b'{"name": "x", "version": "1", "tools": [], "agents": [], "n": NaN}',
        b'{"name": "x", "version": "1", "tools": [], "agents": [], "n": 1e999}',
    ]


def zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


# -- ids the daemon has handed out ----------------------------------------------------------------------


class Seen:
    """Values from the daemon's answers (ids, names, page tokens), to make requests that reach past
    the first lookup. Picked by index from an rng, so the choice is seeded even if the values are not."""

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}
        self.blocked: set[str] = set()  # never picked (e.g. the id of the key the run itself uses)
        # (caller, kind) -> the id of a resource kept usable by the run (an active session, a
        # running container, a stored bundle), renewed each round: most fuzzed calls must name
        # something real, or they stop at NOT_FOUND / FAILED_PRECONDITION
        self.live: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()

    def add(self, kind: str, value: str) -> None:
        if not value or len(value) > 512 or value in self.blocked:
            return
        with self.lock:
            bucket = self.values.setdefault(kind, [])
            if value not in bucket:
                bucket.append(value)
                if len(bucket) > 64:
                    del bucket[0]

    def pick(self, rng: random.Random, *kinds: str) -> str | None:
        with self.lock:
            for kind in kinds:
                bucket = self.values.get(kind)
                if bucket:
                    return bucket[rng.randrange(len(bucket))]
        return None

    def harvest(self, msg: Message, parent: str = "") -> None:
        """Every id-like string in a response (id, *_id, name, page tokens)."""
        for field, value in msg.ListFields():
            if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
                if field.name == "id":
                    self.add(parent or "id", value)
                    self.add("id", value)
                elif field.name.endswith("_id") or field.name.endswith("_token"):
                    self.add(field.name.replace("next_", ""), value)
                    if field.name.endswith("_id"):
                        self.add("id", value)
                elif field.name == "name":
                    self.add(f"{parent}.name", value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry:
                    continue
                kind = field.message_type.name.lower()
                items = value if field.is_repeated else [value]
                for item in list(items)[:50]:
                    self.harvest(item, kind)


# -- making requests ------------------------------------------------------------------------------------

I32, I64 = (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1)
U32, U64 = (0, 2**32 - 1), (0, 2**64 - 1)
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: I32,
    FieldDescriptor.TYPE_SINT32: I32,
    FieldDescriptor.TYPE_SFIXED32: I32,
    FieldDescriptor.TYPE_INT64: I64,
    FieldDescriptor.TYPE_SINT64: I64,
    FieldDescriptor.TYPE_SFIXED64: I64,
    FieldDescriptor.TYPE_UINT32: U32,
    FieldDescriptor.TYPE_FIXED32: U32,
    FieldDescriptor.TYPE_UINT64: U64,
    FieldDescriptor.TYPE_FIXED64: U64,
}
DOUBLES = [
    0.0,
    -0.0,
    -1.0,
    1.0,
    0.5,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    2.0**53 + 1,
    1e-9,
    86400.0 * 365 * 1000,
]
FLOATS = [0.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45]
IS_JSON = ("_json",)
JSON_FIELDS_BY_NAME = {"command_json", "arguments_json", "input_schema_json", "manifest_json", "detail_json"}


def is_json_field(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_STRING and field.name.endswith(IS_JSON)


def is_command_field(field: FieldDescriptor) -> bool:
    return field.name == "command" and field.type == FieldDescriptor.TYPE_STRING


STRUCT, VALUE, LIST_VALUE = "google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"
TIMESTAMP, DURATION = "google.protobuf.Timestamp", "google.protobuf.Duration"


class Maker:
    """Builds requests for one route in one round, from one rng, for one caller ("" is the main one)."""

    def __init__(self, rng: random.Random, seen: Seen, hints: Hints, caller: str = "") -> None:
        self.rng = rng
        self.seen = seen
        self.hints = hints
        self.caller = caller
        self.notes: list[str] = []

    def live(self, field: FieldDescriptor, parent: Descriptor) -> str | None:
        """The id of a live resource this field may name: `session_id` -> a session; `id` of a
        ContainerRef -> a container; ..."""
        if field.name == "id":
            kind = parent.name.lower().removesuffix("ref").removesuffix("request")
            for k in ("container", "task", "bundle", "session"):
                if kind.startswith(k) or kind.endswith(k) or k in kind:
                    kind = k
                    break
        else:
            kind = field.name.removesuffix("_id")
        return self.seen.live.get((self.caller, kind))

    # values --------------------------------------------------------------------------------------

    def odd_string(self) -> str:
        r = self.rng.random()
        if r < 0.06:
            size = self.rng.choice(HUGE_SIZES[:3])
            self.notes.append(f"huge string ({size} chars)")
            return self.rng.choice("xé\0") * (size // 2 if size > 1024 * 1024 else size)
        if r < 0.55:
            return self.rng.choice(ODD_STRINGS)
        if r < 0.75:
            return "".join(chr(self.rng.randrange(0x20, 0x7F)) for _ in range(self.rng.randrange(1, 40)))
        if r < 0.9:
            # unicode from all planes, no lone surrogates (a str with one cannot be encoded)
            chars = []
            for _ in range(self.rng.randrange(1, 20)):
                c = self.rng.randrange(0, 0x110000)
                chars.append(chr(c) if not 0xD800 <= c < 0xE000 else "\ufffd")
            return "".join(chars)
        return self.rng.choice(BAD_JSON[:28] + WRONG_JSON[:26])

    def odd_bytes(self) -> bytes:
        r = self.rng.random()
        if r < 0.05:
            return self.rng.randbytes(self.rng.choice(HUGE_SIZES[:3]))
        if r < 0.3:
            return self.rng.choice([b"", b"\0", b"\xff\xfe\xfd", b"\xc0\x80", b"\xed\xa0\x80", b"PK\x03\x04"])
        return self.rng.randbytes(self.rng.randrange(0, 300))

    def extreme_number(self, field: FieldDescriptor) -> Any:
        if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT) and self.rng.random() < 0.45:
            return self.rng.choice([math.nan, math.inf, -math.inf])
        if field.type == FieldDescriptor.TYPE_DOUBLE:
            return self.rng.choice(DOUBLES)
        if field.type == FieldDescriptor.TYPE_FLOAT:
            return self.rng.choice(FLOATS)
        if field.type == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if field.type == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            return self.rng.choice([*known, -1, 99, 2**31 - 1, -(2**31)])
        lo, hi = INT_RANGES[field.type]
        return self.rng.choice(
            [
                0,
                1,
                -1 if lo < 0 else 2,
                lo,
                hi,
                hi - 1,
                lo + 1 if lo < 0 else 3,
                1000,
                1001,
                3600,
                86401,
                2**31 - 1 if hi > 2**31 else hi,
            ]
        )

    def plausible_scalar(self, field: FieldDescriptor, parent: Descriptor) -> Any:
        hint = self.hints.value(self, field, parent)
        if hint is not NO_HINT:
            return hint
        t = field.type
        if t == FieldDescriptor.TYPE_STRING:
            if field.name == "id" or field.name.endswith("_id"):
                live = self.live(field, parent)
                if live is not None and self.rng.random() < 0.5:
                    return live
                found = self.seen.pick(self.rng, field.name, parent.name.lower().replace("ref", ""), "id")
                if found is not None and self.rng.random() < 0.8:
                    return found
            return self.rng.choice(["", "fuzz", f"fuzz-{self.rng.randrange(1000)}"])
        if t == FieldDescriptor.TYPE_BYTES:
            return self.rng.choice([b"", b"fuzz\n"])
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice([0.0, 0.5, 1.0, 2.0])
        if t == FieldDescriptor.TYPE_BOOL:
            # (follow/wait true would make most calls wait for our deadline)
            return self.rng.random() < (0.1 if field.name in ("follow", "wait") else 0.5)
        if t == FieldDescriptor.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return self.rng.choice(values)
        return self.rng.choice([0, 1, 2, 10])

    def odd_scalar(self, field: FieldDescriptor) -> Any:
        t = field.type
        if t == FieldDescriptor.TYPE_STRING:
            if is_json_field(field) and self.rng.random() < 0.5:
                return self.json_text()
            return self.odd_string()
        if t == FieldDescriptor.TYPE_BYTES:
            return self.odd_bytes()
        return self.extreme_number(field)

    def json_text(self) -> str:
        r = self.rng.random()
        pool = DEEP_JSON if r < 0.3 else BAD_JSON if r < 0.65 else WRONG_JSON
        text = self.rng.choice(pool)
        self.notes.append(f"json {_short(text)}")
        return text

    # messages ------------------------------------------------------------------------------------

    def fill(self, msg: Message, depth: int = 0, odd: float = 0.0) -> None:
        """Set fields of `msg` plausibly; each scalar is odd with probability `odd`."""
        desc = msg.DESCRIPTOR
        oneofs_done: set[str] = set()
        for field in desc.fields:
            if field.containing_oneof is not None:
                if field.containing_oneof.name in oneofs_done:
                    continue
                members = field.containing_oneof.fields
                oneofs_done.add(field.containing_oneof.name)
                field = members[self.rng.randrange(len(members))]
                if self.rng.random() < 0.1:
                    continue
            elif self.rng.random() < 0.35 and not self.hints.required(field, desc):
                continue  # leave it unset
            self.set_field(msg, field, depth, odd)

    def set_field(self, msg: Message, field: FieldDescriptor, depth: int, odd: float) -> None:
        desc = msg.DESCRIPTOR
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(msg, field.name)
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(self.rng.randrange(0, 4)):
                key = self.odd_scalar(key_f) if self.rng.random() < odd else self.plausible_scalar(key_f, desc)
                if value_f.message_type is not None:
                    if depth < 4:
                        self.fill(target[key], depth + 1, odd)
                else:
                    target[key] = (
                        self.odd_scalar(value_f) if self.rng.random() < odd else self.plausible_scalar(value_f, desc)
                    )
            return
        if field.message_type is not None:
            if depth >= 4:
                return
            if field.is_repeated:
                for _ in range(self.rng.randrange(0, 3)):
                    item = getattr(msg, field.name).add()
                    self.fill_special(item, depth + 1, odd) or self.fill(item, depth + 1, odd)
                return
            sub = getattr(msg, field.name)
            if not self.fill_special(sub, depth + 1, odd):
                self.fill(sub, depth + 1, odd)
                sub.SetInParent()
            return
        if field.is_repeated:
            hinted = self.hints.repeated(self, field, desc)
            if hinted is not None:
                getattr(msg, field.name).extend(hinted)
                return
            values = [
                self.odd_scalar(field) if self.rng.random() < odd else self.plausible_scalar(field, desc)
                for _ in range(self.rng.randrange(0, 3))
            ]
            getattr(msg, field.name).extend(values)
            return
        value = self.odd_scalar(field) if self.rng.random() < odd else self.plausible_scalar(field, desc)
        setattr(msg, field.name, value)

    def fill_special(self, msg: Message, depth: int, odd: float) -> bool:
        """Well-known types: Timestamp, Duration, Struct, Value. True if handled."""
        name = msg.DESCRIPTOR.full_name
        if name in (TIMESTAMP, DURATION):
            if self.rng.random() < odd:
                msg.seconds = self.rng.choice([-(2**63), 2**63 - 1, -62135596801, 253402300800, -1, 0])
                msg.nanos = self.rng.choice([0, -1, 999_999_999, 1_000_000_000, 2**31 - 1, -(2**31)])
            else:
                msg.seconds = int(time.time()) - self.rng.randrange(0, 3600)
            return True
        if name == STRUCT:
            for _ in range(self.rng.randrange(1, 4)):
                key = self.hints.struct_key(self) if self.rng.random() >= odd else self.odd_string()
                self.fill_value(msg.fields[key], depth, odd)
            return True
        if name == VALUE:
            self.fill_value(msg, depth, odd)
            return True
        return False

    def fill_value(self, value: Message, depth: int, odd: float) -> None:
        r = self.rng.random()
        if r < 0.15:
            value.null_value = 0
        elif r < 0.35:
            value.number_value = (
                self.rng.choice(DOUBLES) if self.rng.random() < odd else self.rng.choice([0.0, 0.7, 2.5, 3.0])
            )
        elif r < 0.6:
            value.string_value = (
                self.odd_string() if self.rng.random() < odd else self.rng.choice(["fake-model", "dark", "x"])
            )
        elif r < 0.7:
            value.bool_value = self.rng.random() < 0.5
        elif r < 0.85 and depth < 6:
            for _ in range(self.rng.randrange(0, 3)):
                self.fill_value(value.list_value.values.add(), depth + 1, odd)
            value.list_value.SetInParent()
        elif depth < 6:
            for _ in range(self.rng.randrange(0, 3)):
                self.fill_value(
                    value.struct_value.fields[self.odd_string() if self.rng.random() < odd else "k"], depth + 1, odd
                )
            value.struct_value.SetInParent()
        else:
            value.string_value = "leaf"

    def valid(self, cls: Any) -> Message:
        msg = cls()
        self.fill(msg)
        self.hints.finish(self, msg)
        return msg

    def mutated(self, cls: Any) -> Message:
        msg = self.valid(cls)
        fields = self._all_fields(msg.DESCRIPTOR)
        if not fields:
            return msg
        for _ in range(self.rng.randrange(1, 4)):
            path = fields[self.rng.randrange(len(fields))]
            self.mutate_at(msg, path)
        self.hints.finish(self, msg)
        return msg

    def _all_fields(
        self, desc: Descriptor, prefix: tuple[FieldDescriptor, ...] = (), depth: int = 0
    ) -> list[tuple[FieldDescriptor, ...]]:
        out = []
        for f in desc.fields:
            out.append((*prefix, f))
            if (
                f.message_type is not None
                and not f.message_type.GetOptions().map_entry
                and not f.is_repeated
                and depth < 3
                and f.message_type.full_name not in (STRUCT, VALUE, LIST_VALUE, TIMESTAMP, DURATION)
            ):
                out.extend(self._all_fields(f.message_type, (*prefix, f), depth + 1))
        return out

    def mutate_at(self, msg: Message, path: tuple[FieldDescriptor, ...]) -> None:
        for f in path[:-1]:
            msg = getattr(msg, f.name)
        field = path[-1]
        where = ".".join(f.name for f in path)
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if is_map:
            target = getattr(msg, field.name)
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            many = self.rng.random() < 0.3
            count = self.rng.choice([2000, 5000]) if many else self.rng.randrange(1, 6)
            self.notes.append(f"{where}: {count} odd entries")
            for i in range(count):
                key = (
                    self.odd_scalar(key_f) if not many else (f"k{i}" if self.rng.random() < 0.9 else self.odd_string())
                )
                if many and isinstance(key, str) and len(key) > 1024:
                    key = key[:1024]
                if value_f.message_type is not None:
                    self.fill(target[key], 1, 0.5)
                else:
                    target[key] = self.odd_scalar(value_f) if not many else "v"
            return
        if field.message_type is not None:
            if field.is_repeated:
                count = self.rng.choice([0, 1, 100, 3000])
                self.notes.append(f"{where}: {count} entries")
                target = getattr(msg, field.name)
                del target[:]
                for _ in range(count):
                    item = target.add()
                    if not self.fill_special(item, 2, 0.5):
                        self.fill(item, 2, 0.3 if count < 100 else 0.0)
                return
            sub = getattr(msg, field.name)
            sub.Clear()
            if self.rng.random() < 0.3:
                sub.SetInParent()
                self.notes.append(f"{where}: empty message")
            else:
                if not self.fill_special(sub, 1, 1.0):
                    self.fill(sub, 1, 0.8)
                sub.SetInParent()
                self.notes.append(f"{where}: odd message")
            return
        if field.is_repeated:
            target = getattr(msg, field.name)
            del target[:]
            r = self.rng.random()
            if r < 0.3:
                count = self.rng.choice([1000, 5000, 20000])
                self.notes.append(f"{where}: {count} entries")
                one = (
                    self.odd_scalar(field) if self.rng.random() < 0.5 else self.plausible_scalar(field, msg.DESCRIPTOR)
                )
                if isinstance(one, str) and len(one) > 100:
                    one = one[:100]
                if isinstance(one, bytes) and len(one) > 100:
                    one = one[:100]
                target.extend([one] * count)
            elif r < 0.5 and is_command_field(field):
                cmd = self.command_args()
                target.extend(cmd)
            else:
                values = [self.odd_scalar(field) for _ in range(self.rng.randrange(1, 5))]
                self.notes.append(f"{where}: {[_short(v) for v in values]}")
                target.extend(values)
            return
        value = self.odd_scalar(field)
        self.notes.append(f"{where}={_short(value)}")
        setattr(msg, field.name, value)

    def command_args(self) -> list[str]:
        """An argv that is odd but ends at once if it runs at all."""
        choice = self.rng.choice(
            [
                [""],
                ["", "x"],
                ["\0"],
                ["true\0false"],
                ["/nonexistent/binary"],
                ["."],
                ["/"],
                ["/dev/null"],
                ["true", "\0"],
                ["true"] + ["a" * 100] * 3000,
                ["echo", "x" * 200_000],
                ["true", "é", "\U0001f600"],
                ["sh", "-c", "exit 255"],
                ["sh", "-c", "kill -9 $$"],
                ["sh", "-c", "printf '\\377\\376\\000bin\\n'"],
                ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"],  # one long line
                ["ls", "-la", "/"],
                ["cat", "/proc/self/status"],
                ["--version"],
                ["-"],
                ["../../bin/true"],
            ]
        )
        self.notes.append(f"command {[_short(a) for a in choice[:4]]}{'...' if len(choice) > 4 else ''}")
        return choice

    def sweep(self, cls: Any) -> Iterator[tuple[str, Message]]:
        """Each field of a valid message set, in turn, to each value at or past its bounds (the
        systematic part of the run, before the random rounds): NUL bytes and echo-sized strings,
        arguments past the kernel's 128 KiB, NaN and the infinities, -1 and the maximum, a
        Timestamp outside 0001..9999, JSON nested past the parser's depth or with a lone surrogate."""
        base = self.valid(cls)
        for path in self._all_fields(cls.DESCRIPTOR):
            f = path[-1]
            where = ".".join(x.name for x in path)
            for label, setter in self._extremes(f):
                msg = cls()
                msg.CopyFrom(base)
                m = msg
                for x in path[:-1]:
                    m = getattr(m, x.name)
                try:
                    setter(m)
                except (TypeError, ValueError, OverflowError):
                    continue
                self.hints.finish(self, msg)
                yield f"sweep {where} = {label}", msg

    def _extremes(self, f: FieldDescriptor) -> list[tuple[str, Callable[[Message], None]]]:
        name = f.name
        out: list[tuple[str, Callable[[Message], None]]] = []

        def put(value: Any) -> Callable[[Message], None]:
            def setter(m: Message) -> None:
                if f.is_repeated:
                    target = getattr(m, name)
                    del target[:]
                    target.extend(value if isinstance(value, list) else [value])
                else:
                    setattr(m, name, value)

            return setter

        if f.message_type is not None:
            full = f.message_type.full_name
            if f.message_type.GetOptions().map_entry:
                key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                if key_f.type == FieldDescriptor.TYPE_STRING and value_f.type == FieldDescriptor.TYPE_STRING:
                    out.append(("{'a\\0b': 'x'}", lambda m: getattr(m, name).update({"a\0b": "x"})))
                    out.append(("{'': ''}", lambda m: getattr(m, name).update({"": ""})))
                    out.append(("{'A': 'é' * 70000}", lambda m: getattr(m, name).update({"A": "é" * 70_000})))
                return out
            if full in (TIMESTAMP, DURATION) and not f.is_repeated:
                for secs, nanos in ((253402300800, 0), (-62135596801, 0), (0, -1), (2**63 - 1, 0)):
                    out.append(
                        (
                            f"Timestamp({secs}, {nanos})",
                            lambda m, a=secs, b=nanos: getattr(m, name).MergeFrom(
                                type(getattr(m, name))(seconds=a, nanos=b)
                            ),
                        )
                    )
            if full == STRUCT and not f.is_repeated:
                key = "theme"
                for label, fn in (
                    ("NaN", lambda v: setattr(v, "number_value", math.nan)),
                    ("inf", lambda v: setattr(v, "number_value", math.inf)),
                    ("a list 40 deep", _deep_list),
                    ("the string [[[...5000", lambda v: setattr(v, "string_value", "[" * 5000)),
                ):
                    out.append((f"{{{key!r}: {label}}}", lambda m, fn=fn: fn(getattr(m, name).fields[key])))
                    out.append(
                        (
                            f"{{'llm.temperature': {label}}}",
                            lambda m, fn=fn: fn(getattr(m, name).fields["llm.temperature"]),
                        )
                    )
            return out
        t = f.type
        if t == FieldDescriptor.TYPE_STRING:
            if is_command_field(f):
                return [
                    ("['true', 'x' * 140000]", put(["true", "x" * 140_000])),
                    ("['a\\0b']", put(["a\0b"])),
                    ("['true'] + ['a'] * 5000", put(["true"] + ["a"] * 5000)),
                ]
            out += [("'a\\0b'", put("a\0b")), ("'x' * 20000", put("x" * 20_000)), ("'é' * 70000", put("é" * 70_000))]
            if is_json_field(f):
                out += [
                    ("'[' * 5000 + ']' * 5000", put("[" * 5000 + "]" * 5000)),
                    ("'[' * 100000 + ']' * 100000", put("[" * DEEP + "]" * DEEP)),
                    ("'[\"\\ud800\"]'", put('["\\ud800"]')),
                    ("'1' * 100000", put("1" * 100_000)),
                    ("'[NaN]'", put("[NaN]")),
                ]
            elif f.name.endswith("_token"):
                # page tokens that are base64 of JSON (unsigned ones): hostile JSON inside
                for label, raw in (("deep", b"[" * 5000 + b"]" * 5000), ("[1e999, null]", b"[1e999, null]")):
                    out.append((f"base64url({label})", put(base64.urlsafe_b64encode(raw).decode())))
            elif f.name == "input":
                out += [
                    (f"'/run_command ' + {lbl}", put("/run_command " + j))
                    for lbl, j in (
                        ("deep", "[" * 5000 + "]" * 5000),
                        ("surrogate", '{"command": ["\\ud800"]}'),
                        ("NUL", '{"command": ["a\\u0000b"]}'),
                    )
                ]
            return out
        if t == FieldDescriptor.TYPE_BYTES:
            return [("b'\\xff' * 2 MiB", put(b"\xff" * (2 << 20)))]
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return [(repr(v), put(v)) for v in (math.nan, math.inf, -math.inf, -1.0, 1e308)]
        if t in INT_RANGES:
            lo, hi = INT_RANGES[t]
            return [
                (repr(v), put(v)) for v in ({lo, -1, hi} if lo < 0 else {hi, 2**31, 2**31 - 1} if hi > 2**32 else {hi})
            ]
        if t == FieldDescriptor.TYPE_ENUM:
            return [(repr(v), put(v)) for v in (-1, 2**31 - 1)]
        return out

    def json_mutated(self, cls: Any) -> Message | None:
        """A valid message whose JSON-carrying fields hold bad JSON; None if it has none."""
        msg = self.valid(cls)
        targets = []
        for path in self._all_fields(msg.DESCRIPTOR):
            f = path[-1]
            if is_json_field(f) or is_command_field(f) or self.hints.is_json_like(f, path):
                targets.append(path)
            elif f.message_type is not None and f.message_type.full_name == STRUCT:
                targets.append(path)
        if not targets:
            return None
        for path in self.rng.sample(targets, min(len(targets), self.rng.randrange(1, 3))):
            m = msg
            for f in path[:-1]:
                m = getattr(m, f.name)
            f = path[-1]
            where = ".".join(x.name for x in path)
            if f.message_type is not None and f.message_type.full_name == STRUCT:
                struct = getattr(m, f.name)
                key = self.hints.struct_key(self)
                self.struct_json(struct, key)
                self.notes.append(f"{where}[{_short(key)}]")
            elif is_command_field(f):
                target = getattr(m, f.name)
                del target[:]
                if self.rng.random() < 0.5:
                    target.extend(self.command_args())
                else:
                    text = self.json_text()
                    target.extend([text] if self.rng.random() < 0.5 else ["sh", "-c", "exit 0", text])
            elif is_json_field(f):
                setattr(m, f.name, self.json_text())
                self.notes.append(f"in {where}")
            else:
                setattr(m, f.name, self.hints.json_like(self, f, path))
        self.hints.finish(self, msg)
        return msg

    def struct_json(self, struct: Message, key: str) -> None:
        """A preference value holding JSON-ish trouble: a string of bad JSON, a NaN, a deep list."""
        value = struct.fields[key]
        r = self.rng.random()
        if r < 0.4:
            value.string_value = self.json_text()
        elif r < 0.6:
            value.number_value = self.rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0])
            self.notes.append(f"number {value.number_value}")
        elif r < 0.8:
            inner = value
            depth = self.rng.choice([20, 40, 60])
            for _ in range(depth):
                inner = inner.list_value.values.add()
            inner.string_value = "deep"
            self.notes.append(f"a list {depth} deep")
        else:
            for i in range(self.rng.choice([100, 3000])):
                value.struct_value.fields[f"k{i}"].string_value = "v" * 10
            self.notes.append(f"an object of {len(value.struct_value.fields)} keys")

    def wire(self, cls: Any) -> bytes:
        """A valid message's bytes, damaged below protobuf."""
        base = self.valid(cls).SerializeToString()
        desc = cls.DESCRIPTOR
        strings = [f for f in desc.fields if f.type == FieldDescriptor.TYPE_STRING]
        structs = [f for f in desc.fields if f.message_type is not None and f.message_type.full_name in (STRUCT, VALUE)]
        choices = [
            "truncate",
            "flip",
            "endless varint",
            "long length",
            "field 0",
            "group",
            "unknown fields",
            "overflow",
        ]
        if strings:
            choices += ["invalid utf-8"] * 3
        if structs:
            choices += ["deep struct"] * 2
        kind = self.rng.choice(choices)
        self.notes.append(f"wire: {kind}")
        if kind == "truncate" and base:
            return base[: self.rng.randrange(len(base))]
        if kind == "flip" and base:
            data = bytearray(base)
            for _ in range(self.rng.randrange(1, 4)):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            return bytes(data)
        if kind == "endless varint":
            return base + tag(1, 0) + b"\xff" * self.rng.choice([10, 11, 100])
        if kind == "long length":
            return (
                base
                + tag(self.rng.choice([f.number for f in desc.fields] or [1]), 2)
                + varint(self.rng.choice([2**31, 2**32 + 5, 2**63, 1000]))
            )
        if kind == "field 0":
            return base + b"\x00\x01"
        if kind == "group":
            return base + tag(self.rng.randrange(1, 20), 3) + (tag(9, 0) + b"\x01") * self.rng.choice([1, 200])
        if kind == "unknown fields":
            return base + b"".join(
                length_delimited(self.rng.randrange(100, 2**29), self.rng.randbytes(8))
                for _ in range(self.rng.choice([1, 50, 2000]))
            )
        if kind == "overflow":
            numeric = [
                f
                for f in desc.fields
                if f.type in INT_RANGES or f.type in (FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_BOOL)
            ]
            if numeric:
                f = self.rng.choice(numeric)
                self.notes.append(f"{f.name} = 2**64-1 / 2**40 as a varint")
                return base + tag(f.number, 0) + varint(self.rng.choice([2**64 - 1, 2**40, 2**32, 2**31]))
            return base + tag(1, 0) + varint(2**64 - 1)
        if kind == "invalid utf-8":
            f = self.rng.choice(strings)
            bad = self.rng.choice(
                [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"abc\xfe", b"\xf4\x90\x80\x80", b"\x80" * 1000]
            )
            self.notes.append(f"{f.name}: {bad[:8]!r}")
            return base + length_delimited(f.number, bad)
        if kind == "deep struct":
            f = self.rng.choice(structs)
            depth = self.rng.choice([120, 1000, DEEP])
            self.notes.append(f"{f.name}: nested {depth} deep")
            value = nested_value(depth)
            if f.message_type.full_name == STRUCT:
                entry = length_delimited(1, b"k") + length_delimited(2, value)  # Struct.fields map entry
                return base + length_delimited(f.number, length_delimited(1, entry))
            return base + length_delimited(f.number, value)
        return base + self.rng.randbytes(16)

    def random_bytes(self) -> bytes:
        r = self.rng.random()
        if r < 0.2:
            return b""
        if r < 0.3:
            return self.rng.randbytes(self.rng.choice([100_000, 1_000_000]))
        return self.rng.randbytes(self.rng.randrange(1, 400))


def _deep_list(value: Message, depth: int = 40) -> None:
    inner = value
    for _ in range(depth):
        inner = inner.list_value.values.add()
    inner.string_value = "deep"


NO_HINT = object()


class Hints:
    """What plausible values look like, by field name (not by method: new methods get them too)."""

    def __init__(self, safe_url: str, service_names: list[str]) -> None:
        self.safe_url = safe_url
        self.service_names = service_names

    def required(self, field: FieldDescriptor, parent: Descriptor) -> bool:
        return field.name in (
            "command_json",
            "command",
            "input",
            "session_id",
            "container_id",
            "id",
            "bundle_id",
            "task_id",
        )

    def value(self, mk: Maker, field: FieldDescriptor, parent: Descriptor) -> Any:
        n, rng = field.name, mk.rng
        if field.type == FieldDescriptor.TYPE_STRING:
            if n == "command_json":
                return json.dumps(rng.choice(QUICK_COMMANDS))
            if n == "arguments_json":
                return rng.choice(["{}", '{"a": 1, "b": 2}', '{"text": "hi"}', '{"name": "x"}'])
            if n == "type" and parent.name == "LaunchTaskRequest":
                cid = mk.seen.pick(rng, "container", "container_id")
                return "container:run" if cid is None or rng.random() < 0.6 else f"container:exec:{cid}"
            if n in ("image", "image_path"):
                return rng.choice(["", "host"])
            if n == "workdir":
                return rng.choice(["", "/workspace", "/tmp"])
            if n == "filename" or (n == "name" and parent.name == "BundleMetadata"):
                return "fuzz.aria"
            if n == "input":
                tool = mk.seen.pick(rng, "tooldefinition.name") or "run_command"
                return rng.choice(
                    [
                        "hello",
                        f'/{tool} {{"command": ["true"]}}',
                        '/run_command {"command": ["echo", "hi"]}',
                        f"/{tool} {{}}",
                    ]
                )
            if n == "event_types":
                return rng.choice(["bundle_upload", "task_status", "container_status"])
            if n == "service" and parent.full_name.startswith("grpc.health"):
                return rng.choice(["", *self.service_names])
            if n in ("file_containing_symbol", "symbol"):
                return rng.choice(self.service_names or [""])
            if n == "user_id":
                return rng.choice(["", "root"])
            if n == "tool_name":
                return mk.seen.pick(rng, "toolsummary.name", "tooldefinition.name") or "add"
            if n == "agent_id":
                return mk.seen.pick(rng, "agent_id") or ""
            if n.endswith("_token"):
                return mk.seen.pick(rng, n) or ""
            if n in ("sha256", "blake3", "sha256_checksum"):
                return ""
            if n == "url" or n.endswith("_url"):
                return rng.choice(["", self.safe_url, "not a url"])
            if n == "host":
                return "localhost"
        if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            if n in ("timeout_seconds", "grace_seconds"):
                return rng.choice([0.0, 0.2, 5.0])
        if field.type in INT_RANGES:
            if n in ("timeout_seconds",):
                return rng.choice([0, 5, 30])
            if n == "page_size":
                return rng.choice([0, 1, 5, 50])
            if n in (
                "memory_bytes",
                "pids",
                "disk_bytes",
                "size_bytes",
                "total_size_bytes",
                "offset",
                "after_sequence",
            ):
                return 0
        if field.type == FieldDescriptor.TYPE_BOOL and n == "network":
            return False
        return NO_HINT

    def repeated(self, mk: Maker, field: FieldDescriptor, parent: Descriptor) -> list[Any] | None:
        if is_command_field(field):
            return list(mk.rng.choice(QUICK_COMMANDS))
        if field.name == "event_types":
            return mk.rng.sample(["bundle_upload", "task_status", "container_status"], mk.rng.randrange(0, 3))
        return None

    def struct_key(self, mk: Maker) -> str:
        return mk.rng.choice(
            ["theme", "llm.model", "llm.temperature", "llm.system_prompt", "llm.api_key", "llm.base_url", "llm", "x"]
        )

    def is_json_like(self, field: FieldDescriptor, path: tuple[FieldDescriptor, ...]) -> bool:
        return field.name == "input" and field.type == FieldDescriptor.TYPE_STRING

    def json_like(self, mk: Maker, field: FieldDescriptor, path: tuple[FieldDescriptor, ...]) -> str:
        # a turn's input: `/<tool> <arguments>` runs a tool without a model
        tool = mk.rng.choice(
            [mk.seen.pick(mk.rng, "tooldefinition.name") or "run_command", "run_command", "launch_task", "nope", ""]
        )
        return f"/{tool} {mk.json_text()}"

    def finish(self, mk: Maker, msg: Message) -> None:
        """Safety: no URL that leaves this machine, whatever the mutation made."""
        self._safe(msg)

    def _safe(self, msg: Message) -> None:
        for field, value in msg.ListFields():
            if field.message_type is not None:
                if field.message_type.GetOptions().map_entry:
                    continue
                if field.message_type.full_name == STRUCT:
                    if (
                        "llm.base_url" in value.fields
                        and value.fields["llm.base_url"].WhichOneof("kind") == "string_value"
                    ):
                        value.fields["llm.base_url"].string_value = self.safe_url
                    continue
                items = value if field.is_repeated else [value]
                for item in items:
                    self._safe(item)
            elif field.type == FieldDescriptor.TYPE_STRING and (field.name == "url" or field.name.endswith("_url")):
                if not field.is_repeated and "://" in value and "127.0.0.1" not in value:
                    setattr(msg, field.name, self.safe_url)


def _short(v: Any, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 12] + f"...<{len(v) if hasattr(v, '__len__') else '?'}>"


# -- bundle uploads (client streams) ---------------------------------------------------------------------


def upload_messages(mk: Maker, route: Route, strategy: str, good_bundle: bytes) -> list[Message] | None:
    """Messages for an upload-shaped client stream (a oneof of metadata / chunk / ...), or None."""
    cls = route.request
    desc = cls.DESCRIPTOR
    if "chunk" not in desc.fields_by_name or "metadata" not in desc.fields_by_name:
        return None
    meta_desc = desc.fields_by_name["metadata"].message_type
    size_field = next((f for f in meta_desc.fields if f.name in ("size_bytes", "total_size_bytes")), None)
    name_field = next((f for f in meta_desc.fields if f.name in ("filename", "name")), None)
    sha_field = next((f for f in meta_desc.fields if f.name in ("sha256", "sha256_checksum")), None)
    rng = mk.rng
    data = good_bundle
    if strategy == "json":
        raw = rng.choice(bad_manifests())
        data = zip_of({"manifest.json": raw, "implementations/tools/add.py": b"def add(a, b):\n    return a + b\n"})
        mk.notes.append(f"a bundle whose manifest is {_short(raw)}")
    elif strategy == "mutated":
        r = rng.random()
        if r < 0.3:
            data = rng.randbytes(rng.randrange(0, 5000))
            mk.notes.append("random bytes as the bundle")
        elif r < 0.5:
            names = [
                rng.choice(["../../evil", "/abs/path", "a\0b", "manifest.json", "x" * 300, "é/ü"]) for _ in range(3)
            ]
            data = zip_of(
                {
                    "manifest.json": json.dumps({"name": "x", "version": "1", "tools": [], "agents": []}).encode(),
                    **{n: b"x" for n in names},
                }
            )
            mk.notes.append(f"a zip with members {names}")
        elif r < 0.7:
            data = good_bundle[: rng.randrange(1, len(good_bundle))]
            mk.notes.append("a truncated bundle")
        else:
            mk.notes.append("odd metadata")
    messages: list[Message] = []
    meta = cls()
    m = meta.metadata
    if name_field is not None:
        setattr(m, name_field.name, "fuzz.aria")
    if size_field is not None:
        setattr(m, size_field.name, len(data))
    if sha_field is not None and rng.random() < 0.5:
        setattr(m, sha_field.name, hashlib.sha256(data).hexdigest())
    if strategy == "mutated" and rng.random() < 0.5:
        fields = mk._all_fields(meta_desc)
        for _ in range(rng.randrange(1, 3)):
            mk.mutate_at(m, fields[rng.randrange(len(fields))])
    m.SetInParent()
    order = rng.random() if strategy == "mutated" else 1.0
    chunk = rng.choice([1, 1000, 64 * 1024])
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)][:200]
    if order < 0.15:
        messages = [cls(chunk=c) for c in chunks] + [meta]  # metadata last
        mk.notes.append("chunks before metadata")
    elif order < 0.3:
        messages = [meta, meta] + [cls(chunk=c) for c in chunks]
        mk.notes.append("metadata twice")
    elif order < 0.4:
        messages = [meta, cls()] + [cls(chunk=c) for c in chunks]
        mk.notes.append("an empty message")
    elif order < 0.5:
        messages = [meta]
        mk.notes.append("metadata only")
    else:
        messages = [meta] + [cls(chunk=c) for c in chunks]
    return messages


# -- running calls ----------------------------------------------------------------------------------------


def _status_of(err: grpc.RpcError) -> tuple[str, str, bool]:
    """(request id, ErrorInfo reason, whether the status details are as the contract says)."""
    request_id, reason, details_ok = "", "", False
    trailers = err.trailing_metadata() or ()
    details = None
    for key, value in trailers:
        if key == "x-request-id":
            request_id = value
        elif key == "grpc-status-details-bin":
            details = value
    if details is not None:
        try:
            status = status_pb2.Status.FromString(details)
            info = error_details_pb2.ErrorInfo()
            has_info = any(d.Unpack(info) for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR))
            reason = info.reason
            has_bad = any(d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in status.details)
            details_ok = has_info and (err.code() != grpc.StatusCode.INVALID_ARGUMENT or has_bad)
        except DecodeError:
            details_ok = False
    return request_id, reason, details_ok


def call(
    channel: grpc.Channel,
    route: Route,
    payloads: list[bytes],
    timeout: float,
    max_responses: int = 16,
    metadata: Any = None,
) -> tuple[grpc.StatusCode, str, str, str, bool, int, bool, list[bytes]]:
    """One call with raw payloads: (code, message, request id, reason, details ok, responses read,
    cancelled by us, the responses)."""
    ident = lambda b: b  # noqa: E731
    responses: list[bytes] = []
    cancelled = False
    try:
        if route.client_streaming and route.server_streaming:
            it = channel.stream_stream(route.path, ident, ident)(iter(payloads), timeout=timeout, metadata=metadata)
            for r in it:
                responses.append(r)
                if len(responses) >= max_responses:
                    cancelled = True
                    it.cancel()
                    break
            trailers = it.trailing_metadata() if not cancelled else ()
        elif route.server_streaming:
            it = channel.unary_stream(route.path, ident, ident)(payloads[0], timeout=timeout, metadata=metadata)
            for r in it:
                responses.append(r)
                if len(responses) >= max_responses:
                    cancelled = True
                    it.cancel()
                    break
            trailers = it.trailing_metadata() if not cancelled else ()
        elif route.client_streaming:
            r, c = channel.stream_unary(route.path, ident, ident).with_call(
                iter(payloads), timeout=timeout, metadata=metadata
            )
            responses.append(r)
            trailers = c.trailing_metadata()
        else:
            r, c = channel.unary_unary(route.path, ident, ident).with_call(
                payloads[0], timeout=timeout, metadata=metadata
            )
            responses.append(r)
            trailers = c.trailing_metadata()
        rid = next((v for k, v in trailers or () if k == "x-request-id"), "")
        return OK, "", rid, "", True, len(responses), cancelled, responses
    except grpc.RpcError as err:
        if cancelled or (err.code() == grpc.StatusCode.CANCELLED and len(responses) >= max_responses):
            return OK, "", "", "", True, len(responses), True, responses
        rid, reason, details_ok = _status_of(err)
        return err.code(), err.details() or "", rid, reason, details_ok, len(responses), False, responses


# -- discovery ----------------------------------------------------------------------------------------------


def discover(channel: grpc.Channel, timeout: float = 15) -> list[Route]:
    """Every method of every service the daemon lists in its reflection service, with message
    classes built from the descriptors it serves."""
    stub = channel.stream_stream(
        REFLECTION, refl.ServerReflectionRequest.SerializeToString, refl.ServerReflectionResponse.FromString
    )
    [listing] = list(stub(iter([refl.ServerReflectionRequest(list_services="")]), timeout=timeout))
    names = [s.name for s in listing.list_services_response.service]
    protos: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for r in stub(iter([refl.ServerReflectionRequest(file_containing_symbol=n) for n in names]), timeout=timeout):
        if r.HasField("error_response"):
            raise AssertionError(f"reflection cannot describe a service it lists: {r.error_response}")
        for raw in r.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            protos.setdefault(fd.name, fd)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        fd = protos[name]
        for dep in fd.dependency:
            add(dep)
        pool.Add(fd)
        added.add(name)

    for name in protos:
        add(name)
    routes = []
    for service_name in names:
        service = pool.FindServiceByName(service_name)
        for m in service.methods:
            routes.append(
                Route(
                    path=f"/{service_name}/{m.name}",
                    service=service_name,
                    name=m.name,
                    request=message_factory.GetMessageClass(m.input_type),
                    response=message_factory.GetMessageClass(m.output_type),
                    client_streaming=m.client_streaming,
                    server_streaming=m.server_streaming,
                )
            )
    return routes


# -- the connection watch --------------------------------------------------------------------------------


class ConnectionWatch:
    """Records the channel's connectivity: once READY, any other state means the connection was lost."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.states: list[tuple[float, grpc.ChannelConnectivity]] = []
        self.ready_once = False
        self.lost: list[float] = []
        self._lock = threading.Lock()
        channel.subscribe(self._seen, try_to_connect=True)

    def _seen(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            now = time.monotonic()
            self.states.append((now, state))
            if state == grpc.ChannelConnectivity.READY:
                self.ready_once = True
            elif self.ready_once and state != grpc.ChannelConnectivity.READY:
                self.lost.append(now)

    def close(self) -> None:
        self.channel.unsubscribe(self._seen)


# -- the fuzzer -------------------------------------------------------------------------------------------

STRATEGIES = [
    "valid",
    "bytes",
    "mutated",
    "json",
    "wire",
    "empty",
    "mutated",
    "json",
    "bytes",
    "wire",
    "valid",
    "metadata",
]


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    failures: list[Outcome] = dataclasses.field(default_factory=list)
    soft: list[Outcome] = dataclasses.field(default_factory=list)  # contract details (see Fuzzer.judge)
    rounds: int = 0
    seconds: float = 0.0

    def codes(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for o in self.outcomes:
            key = o.route.path
            per = out.setdefault(key, {})
            name = o.code.name + ("(cut)" if o.cancelled_by_us else "")
            per[name] = per.get(name, 0) + 1
        return out


class Fuzzer:
    def __init__(
        self,
        channel: grpc.Channel,
        routes: list[Route],
        seed: int,
        hints: Hints,
        good_bundle: bytes,
        *,
        unary_timeout: float = 10.0,
        wait_timeout: float = 0.3,
        log: Callable[[str], None] = print,
    ) -> None:
        self.channel = channel
        self.routes = routes
        self.seed = seed
        self.hints = hints
        self.good_bundle = good_bundle
        self.seen = Seen()
        self.unary_timeout = unary_timeout
        self.wait_timeout = wait_timeout
        self.log = log
        self.report = Report()
        self.other_user: tuple[str, list[tuple[str, str]]] | None = None  # (name, metadata): a second caller
        self.by_value: dict[str, Outcome] = {}  # an id the daemon answered -> the call that got it
        self.slow: dict[str, int] = {}  # route -> calls that hit our deadline without waiting by design

    def make(self, route: Route, round_: int, strategy: str) -> tuple[list[bytes], str, Any, Message | None]:
        rng = random.Random(f"{self.seed}:{route.path}:{round_}")
        metadata = None
        caller = ""
        if strategy != "metadata" and self.other_user is not None and rng.random() < 0.3:
            caller, metadata = self.other_user[0], list(self.other_user[1])
        mk = Maker(rng, self.seen, self.hints, caller)
        if caller:
            mk.notes.append(f"as {caller} (an API key)")
        first: Message | None = None
        if route.client_streaming:
            messages = upload_messages(mk, route, strategy, self.good_bundle)
            if messages is None:
                messages = []
                for _ in range(rng.randrange(1, 4)):
                    msg = self.one(mk, route.request, strategy if strategy != "metadata" else "valid")
                    messages.append(msg)
            payloads = [m if isinstance(m, bytes) else m.SerializeToString() for m in messages]
            first = next((m for m in messages if isinstance(m, Message)), None)
            if strategy == "bytes":
                payloads = [mk.random_bytes() for _ in range(rng.randrange(1, 4))]
                mk.notes = ["random bytes"]
        else:
            one = self.one(mk, route.request, strategy if strategy != "metadata" else "valid")
            if isinstance(one, Message):
                first = one
                payloads = [one.SerializeToString()]
            else:
                payloads = [one]
        if strategy == "metadata":
            metadata = [
                (
                    "authorization",
                    rng.choice(
                        [
                            "",
                            "Bearer",
                            "Bearer ",
                            "Bearer " + "x" * 4000,
                            "Basic abc",
                            "bearer  x",
                            "Bearer %C3%A9",
                            "Bearer ' OR 1=1",
                        ]
                    ),
                )
            ]
            if rng.random() < 0.5:
                metadata.append(("x-fuzz-bin", rng.randbytes(64)))
            mk.notes.append(f"metadata {_short(metadata)}")
        what = "; ".join(mk.notes) or strategy
        return payloads, what, metadata, first

    def one(self, mk: Maker, cls: Any, strategy: str) -> Message | bytes:
        if strategy == "bytes":
            mk.notes.append("random bytes")
            return mk.random_bytes()
        if strategy == "empty":
            return cls()
        if strategy == "mutated":
            return mk.mutated(cls)
        if strategy == "json":
            msg = mk.json_mutated(cls)
            return msg if msg is not None else mk.mutated(cls)
        if strategy == "wire":
            return mk.wire(cls)
        return mk.valid(cls)

    def judge(self, o: Outcome, waits: bool) -> None:
        if o.code == OK:
            pass
        elif o.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if not waits:
                o.problem = f"DEADLINE_EXCEEDED after {o.seconds:.1f}s on a call that does not wait by design"
                self.slow[o.route.path] = self.slow.get(o.route.path, 0) + 1
        elif o.code == grpc.StatusCode.UNIMPLEMENTED:
            if o.reason not in ("NOT_IMPLEMENTED_YET", "UNKNOWN_METHOD", "UNSUPPORTED_ENCODING"):
                o.problem = f"UNIMPLEMENTED ({o.reason}) from a method the server lists"
        elif o.code == grpc.StatusCode.UNAVAILABLE and o.reason.startswith(UPSTREAM_REASONS):
            pass  # the model server's fault, said as such (the fake model sends fuzzed replies)
        elif o.code not in ACCEPTED:
            o.problem = f"{o.code.name}: {o.message[:200]}"
        if not o.problem and "metadata size exceeds" in o.message:
            o.problem = (
                "the server's error trailers are larger than a default client takes (grpc-message echoes the input?): "
                + o.message[:200]
            )
        if not o.problem and o.code not in (OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            if not o.request_id:
                o.problem = (
                    f"{o.code.name} without an x-request-id trailer (made by the client, not the server?): "
                    + o.message[:200]
                )
            elif any(leak in o.message for leak in LEAKS):
                o.problem = f"the error message carries internals: {o.message[:300]!r}"
            elif len(o.message) > 16 * 1024:
                o.problem = f"the error message is {len(o.message)} characters (echoes the input?)"
        if not o.problem and o.code not in (OK, grpc.StatusCode.DEADLINE_EXCEEDED) and not o.details_ok:
            self.report.soft.append(o)
        if o.problem:
            self.report.failures.append(o)
            self.log("FUZZ FAILURE " + o.problem + "\n" + o.describe(self.seed))

    def run_sweep(self, budget: float, refresh: Callable[[], None] | None = None) -> None:
        """Every field of every route (legacy aliases excepted) at each of its extremes, on a
        valid message (Maker.sweep). Deterministic: the same calls in the same order each run."""
        started = time.monotonic()
        aliases = _aliases(self.routes)
        for route in self.routes:
            if route.path in aliases or route.client_streaming:
                continue
            if refresh is not None:
                refresh()
            rng = random.Random(f"{self.seed}:{route.path}:sweep")
            mk = Maker(rng, self.seen, self.hints)
            for what, msg in mk.sweep(route.request):
                if time.monotonic() - started > budget:
                    return
                if self.slow.get(route.path, 0) >= 2:
                    break
                self.send(route, -1, "sweep", [msg.SerializeToString()], what, None, msg)

    def run(
        self,
        budget: float,
        health: Callable[[], None],
        rounds_for_aliases: int = 3,
        refresh: Callable[[], None] | None = None,
    ) -> Report:
        """Round after round over every route until the budget is spent (each round visits every
        route once; routes under a legacy alias of a service also served under its own name, every
        `rounds_for_aliases`-th round). `health` is called after each round (it raises if the
        daemon no longer answers on this channel)."""
        started = time.monotonic()
        round_ = 0
        aliases = _aliases(self.routes)
        while time.monotonic() - started < budget:
            if refresh is not None:
                refresh()
            order = list(self.routes)
            random.Random(f"{self.seed}:order:{round_}").shuffle(order)
            for route in order:
                if time.monotonic() - started >= budget and round_ > 0:
                    break
                if route.path in aliases and round_ % rounds_for_aliases != 1:
                    continue
                if self.slow.get(route.path, 0) >= 2:
                    continue  # it hangs; reported already, don't spend the budget on it
                strategy = (
                    STRATEGIES[round_ % len(STRATEGIES)]
                    if round_ < len(STRATEGIES)
                    else random.Random(f"{self.seed}:{route.path}:{round_}:s").choice(STRATEGIES)
                )
                self.one_call(route, round_, strategy)
            health()
            round_ += 1
        self.report.rounds = round_
        self.report.seconds = time.monotonic() - started
        return self.report

    def one_call(self, route: Route, round_: int, strategy: str) -> Outcome:
        payloads, what, metadata, first = self.make(route, round_, strategy)
        return self.send(route, round_, strategy, payloads, what, metadata, first)

    def send(
        self,
        route: Route,
        round_: int,
        strategy: str,
        payloads: list[bytes],
        what: str,
        metadata: Any,
        first: Message | None,
    ) -> Outcome:
        if first is None and payloads and _parses(route.request, payloads[0]):
            first = route.request.FromString(payloads[0])  # (bytes that happen to say follow=true)
        waits = route.waits(first)
        timeout = self.wait_timeout if waits else self.unary_timeout
        began = time.monotonic()
        # a call that waits by design is cut after its first answer: that is what it does with the input
        code, message, rid, reason, details_ok, n, cut, responses = call(
            self.channel, route, payloads, timeout, max_responses=1 if waits else 16, metadata=metadata
        )
        o = Outcome(
            route,
            round_,
            strategy,
            what,
            payloads,
            code,
            message,
            rid,
            reason,
            details_ok,
            n,
            time.monotonic() - began,
            cut,
        )
        o.ended = time.monotonic()
        for r in responses:
            mine = Seen()
            try:
                mine.harvest(route.response.FromString(r))
            except DecodeError:
                o.problem = "a response that does not parse as " + route.response.DESCRIPTOR.full_name
            for kind, values in mine.values.items():
                for v in values:
                    self.seen.add(kind, v)
                    self.by_value.setdefault(v, o)
        self.report.outcomes.append(o)
        self.judge(o, waits)
        return o


def _parses(cls: Any, data: bytes) -> bool:
    try:
        cls.FromString(data)
        return True
    except DecodeError:
        return False


def _aliases(routes: list[Route]) -> set[str]:
    """Paths of services served under two names (aria.X next to aria.v1.X): the shorter name is the alias."""
    by_tail: dict[str, list[Route]] = {}
    for r in routes:
        by_tail.setdefault(r.service.rsplit(".", 1)[-1] + "/" + r.name, []).append(r)
    out = set()
    for group in by_tail.values():
        if len(group) > 1:
            group.sort(key=lambda r: len(r.service), reverse=True)
            out.update(r.path for r in group[1:])
    return out


# -- raw HTTP/2 -------------------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id & 0xFFFFFFFF) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v & 0xFFFFFFFF) for k, v in pairs))


def grpc_message(data: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(data)) + data


def request_headers(path: str, authority: str = "localhost") -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


@dataclasses.dataclass
class Received:
    frames: list[tuple[int, int, int, bytes]]  # (type, flags, stream id, payload)
    closed: bool  # the server closed the connection (EOF or reset)
    garbage: bool  # bytes that do not parse as frames
    headers: list[tuple[int, dict[str, str]]] = dataclasses.field(default_factory=list)  # decoded, per stream

    def status_of(self, stream_id: int) -> str | None:
        """The grpc-status the server sent on a stream, if any."""
        for sid, h in self.headers:
            if sid == stream_id and "grpc-status" in h:
                return h["grpc-status"]
        return None

    def goaway(self) -> tuple[int, int] | None:
        """(last stream id, error code) of the first GOAWAY, if any."""
        for kind, _, _, payload in self.frames:
            if kind == GOAWAY and len(payload) >= 8:
                last, code = struct.unpack(">II", payload[:8])
                return last & 0x7FFFFFFF, code
        return None

    def kinds(self) -> list[int]:
        return [f[0] for f in self.frames]

    def headers_on(self, stream_id: int) -> list[bytes]:
        return [p for k, _, s, p in self.frames if k in (HEADERS, CONTINUATION) and s == stream_id]


class RawH2:
    """A raw connection to a daemon's socket: send bytes, read frames."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False
        self.send_failed = False
        import hpack

        self.decoder = hpack.Decoder()
        self.header_lists: list[tuple[int, dict[str, str]]] = []
        self._block: tuple[int, bytes] | None = None

    def send(self, data: bytes) -> bool:
        """False if the server had closed the connection (we could not send it all)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.send_failed = True
            return False

    def handshake(self) -> None:
        self.send(PREFACE + settings())

    def read(self, seconds: float, until: Callable[[Received], bool] | None = None) -> Received:
        """Frames until EOF, `until` says enough, or `seconds` pass."""
        deadline = time.monotonic() + seconds
        garbage = False
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            self.buffer += data
            while len(self.buffer) >= 9:
                n = int.from_bytes(self.buffer[:3], "big")
                if n > 1 << 24:
                    garbage = True
                    break
                if len(self.buffer) < 9 + n:
                    break
                kind, flags = self.buffer[3], self.buffer[4]
                sid = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
                self.frames.append((kind, flags, sid, self.buffer[9 : 9 + n]))
                if kind in (HEADERS, CONTINUATION):
                    self._header_fragment(kind, flags, sid, self.buffer[9 : 9 + n])
                if kind == SETTINGS and not flags & ACK:
                    self.send(frame(SETTINGS, ACK, 0))
                if kind == PING and not flags & ACK:
                    self.send(frame(PING, ACK, 0, self.buffer[9 : 9 + n]))
                self.buffer = self.buffer[9 + n :]
            got = Received(list(self.frames), self.closed, garbage, list(self.header_lists))
            if until is not None and until(got):
                return got
        return Received(list(self.frames), self.closed, garbage, list(self.header_lists))

    def _header_fragment(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == HEADERS:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._block = (sid, payload)
        elif self._block is not None:
            self._block = (self._block[0], self._block[1] + payload)
        if flags & END_HEADERS and self._block is not None:
            sid, block = self._block
            self._block = None
            try:
                decoded = self.decoder.decode(block)
            except Exception:
                decoded = [("x-undecodable", "")]
            self.header_lists.append(
                (
                    sid,
                    {
                        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                        for k, v in decoded
                    },
                )
            )

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def hpack_block(headers: list[tuple[str, str]]) -> bytes:
    import hpack

    return hpack.Encoder().encode(headers)


def random_frames(rng: random.Random, count: int) -> Iterator[bytes]:
    for _ in range(count):
        kind = rng.choice([*range(10), rng.randrange(10, 256)])
        flags = rng.randrange(256)
        sid = rng.choice([0, 1, 3, 2, 2**31 - 1, rng.randrange(2**32)])
        payload = rng.randbytes(rng.choice([0, 1, 4, 5, 6, 8, 9, 64, 300]))
        yield frame(kind, flags, sid, payload)
