"""quilt.v1's method paths, for Quilt's clients: the runtime's link (runtime/quilt_client) and the
CLI's `aria quilt ...` commands. One place, so that a renamed service is renamed everywhere."""

from __future__ import annotations

CONTAINERS = "/quilt.v1.Containers/"
TASKS = "/quilt.v1.Tasks/"
BUNDLES = "/quilt.v1.Bundles/"
SYSTEM = "/quilt.v1.System/"
