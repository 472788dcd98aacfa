"""Numbered schema migrations; each is applied once, in order, and recorded in schema_migrations.

Times are integer microseconds since the Unix epoch (UTC): they sort, compare and page exactly.
Every row that belongs to someone carries `user_id`, and every query filters on it.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    agent_id      TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'completed', 'failed')),
    context_json  TEXT NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id, created_at DESC, id DESC);

CREATE TABLE messages (
    id               TEXT PRIMARY KEY,
    session_id       TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    role             INTEGER NOT NULL,             -- aria.v1.MessageRole
    content          TEXT NOT NULL DEFAULT '',
    tool_calls_json  TEXT,                         -- assistant: the tool calls it asked for
    tool_call_id     TEXT,                         -- tool: the call this answers
    tool_name        TEXT,
    created_at       INTEGER NOT NULL,
    UNIQUE (session_id, seq)
);

CREATE TABLE containers (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL,
    session_id          TEXT REFERENCES sessions (id) ON DELETE SET NULL,
    name                TEXT NOT NULL,
    image_path          TEXT NOT NULL,
    environment_json    TEXT NOT NULL DEFAULT '{}',
    command_json        TEXT NOT NULL DEFAULT '[]',
    persistent          INTEGER NOT NULL DEFAULT 0,
    status              INTEGER NOT NULL,           -- aria.v1.TaskStatus
    exit_code           INTEGER,
    quilt_container_id  TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);
CREATE INDEX containers_by_user ON containers (user_id, created_at DESC, id DESC);
CREATE INDEX containers_by_session ON containers (session_id) WHERE session_id IS NOT NULL;

CREATE TABLE tasks (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL,
    session_id         TEXT NOT NULL DEFAULT '',
    container_id       TEXT NOT NULL DEFAULT '',
    parent_task_id     TEXT REFERENCES tasks (id) ON DELETE SET NULL,
    type               TEXT NOT NULL,
    command_json       TEXT NOT NULL,
    environment_json   TEXT NOT NULL DEFAULT '{}',
    timeout_seconds    INTEGER NOT NULL DEFAULT 0,
    status             INTEGER NOT NULL,            -- aria.v1.TaskStatus
    created_at         INTEGER NOT NULL,
    started_at         INTEGER,
    completed_at       INTEGER,
    exit_code          INTEGER,
    error_message      TEXT,
    progress_percent   REAL NOT NULL DEFAULT 0,
    current_operation  TEXT NOT NULL DEFAULT '',
    quilt_task_id      TEXT
);
-- ListTasks: newest first, keyset on (created_at, id), filtered by session and/or status.
CREATE INDEX tasks_by_user ON tasks (user_id, created_at DESC, id DESC);
CREATE INDEX tasks_by_session ON tasks (user_id, session_id, created_at DESC, id DESC);
CREATE INDEX tasks_by_status ON tasks (user_id, status, created_at DESC, id DESC);
CREATE INDEX tasks_unfinished ON tasks (status) WHERE status IN (1, 2);

CREATE TABLE task_status_history (
    task_id  TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    status   INTEGER NOT NULL,
    message  TEXT NOT NULL DEFAULT '',
    at       INTEGER NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;

CREATE TABLE task_output (
    task_id  TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    stream   INTEGER NOT NULL,                      -- 1 stdout, 2 stderr, 3 progress
    line     TEXT NOT NULL,
    percent  REAL,
    at       INTEGER NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;

CREATE TABLE notifications (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    sequence       INTEGER NOT NULL,               -- per user, strictly increasing
    type           TEXT NOT NULL,                  -- task_status, bundle_upload, container_status
    title          TEXT NOT NULL DEFAULT '',
    message        TEXT NOT NULL DEFAULT '',
    metadata_json  TEXT NOT NULL DEFAULT '{}',
    payload        BLOB,                           -- the serialized aria.v1.Notification
    read           INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    UNIQUE (user_id, sequence)
);
CREATE TABLE notification_sequences (
    user_id        TEXT PRIMARY KEY,
    last_sequence  INTEGER NOT NULL
);

CREATE TABLE tool_executions (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    session_id       TEXT REFERENCES sessions (id) ON DELETE CASCADE,
    message_id       TEXT,
    tool_name        TEXT NOT NULL,
    parameters_json  TEXT NOT NULL,
    result_json      TEXT,
    error            TEXT,
    duration_ms      REAL,
    container_id     TEXT,
    exit_status      INTEGER,
    started_at       INTEGER NOT NULL
);
CREATE INDEX tool_executions_by_session ON tool_executions (session_id, started_at);
CREATE INDEX tool_executions_by_user ON tool_executions (user_id, started_at DESC);

CREATE TABLE bundles (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    name           TEXT NOT NULL,
    version        TEXT NOT NULL DEFAULT '',
    blake3         TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    manifest_json  TEXT NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE INDEX bundles_by_user ON bundles (user_id, created_at DESC, id DESC);

CREATE TABLE agents (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    bundle_id       TEXT REFERENCES bundles (id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    system_prompt   TEXT,
    model           TEXT,
    max_iterations  INTEGER,
    tools_json      TEXT NOT NULL DEFAULT '[]',
    created_at      INTEGER NOT NULL,
    UNIQUE (user_id, name)
);

CREATE TABLE tools (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL,
    bundle_id          TEXT REFERENCES bundles (id) ON DELETE CASCADE,
    name               TEXT NOT NULL,
    description        TEXT NOT NULL DEFAULT '',
    input_schema_json  TEXT NOT NULL,
    runtime            TEXT NOT NULL,               -- python, node
    entry              TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    UNIQUE (user_id, name)
);

CREATE TABLE user_preferences (
    user_id           TEXT PRIMARY KEY,
    preferences_json  TEXT NOT NULL,
    updated_at        INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    name          TEXT NOT NULL DEFAULT '',
    key_hash      TEXT NOT NULL UNIQUE,             -- never the key itself
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    revoked_at    INTEGER
);
CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at DESC);

CREATE TABLE audit_log (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at             INTEGER NOT NULL,
    actor          TEXT NOT NULL,                   -- the user the call acted for
    action         TEXT NOT NULL,                   -- e.g. task.cancel, preferences.update
    resource_type  TEXT NOT NULL DEFAULT '',
    resource_id    TEXT NOT NULL DEFAULT '',
    request_id     TEXT NOT NULL DEFAULT '',
    detail_json    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_by_actor ON audit_log (actor, at DESC);
CREATE INDEX audit_log_by_time ON audit_log (at DESC);
""",
    ),
    (
        2,
        "tasks and containers follow quilt",
        """
ALTER TABLE tasks ADD COLUMN quilt_container_id TEXT;           -- container:run: its throw-away container
ALTER TABLE tasks ADD COLUMN output_offset INTEGER NOT NULL DEFAULT 0;  -- quilt lines already stored
ALTER TABLE containers ADD COLUMN message TEXT NOT NULL DEFAULT '';
ALTER TABLE bundles ADD COLUMN filename TEXT NOT NULL DEFAULT '';
ALTER TABLE bundles ADD COLUMN layout TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX bundles_by_user_content ON bundles (user_id, blake3);
CREATE INDEX tools_by_bundle ON tools (bundle_id);
CREATE INDEX agents_by_bundle ON agents (bundle_id);
""",
    ),
    (
        3,
        "streamed turns: reasoning, cut-short replies, usage",
        """
ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT '';      -- an assistant's reasoning text
ALTER TABLE messages ADD COLUMN truncated INTEGER NOT NULL DEFAULT 0;    -- 1: cut short as it streamed
ALTER TABLE messages ADD COLUMN usage_json TEXT;                         -- an assistant's model call: tokens, time
""",
    ),
    (
        4,
        "how the last run of the runtime ended (notification sequences after a machine crash)",
        """
CREATE TABLE runtime_runs (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    boot_id  TEXT NOT NULL,      -- the kernel's boot id while that run ran
    clean    INTEGER NOT NULL    -- 1: it ended (whatever the cause) before the machine went down
);
""",
    ),
]
