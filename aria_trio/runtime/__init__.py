"""The runtime daemon (`aria serve`): the public aria.v1 API, its store, and the domain behind it.

Its parts, from the outside in: `services` (gRPC handlers: decode, check, call the domain,
encode), the domain (`work`: tasks, containers, uploads, notifications; `agents`: sessions,
turns, tool calls, the model; `access`: who calls, keys, quotas, audit, preferences;
`operations`: metrics and the dashboard tap), then `store` (its SQLite tables) and
`quilt_client` (the typed client of Quilt). Never imports `quilt` or `cli`.
"""
