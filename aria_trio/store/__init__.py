"""The runtime's SQLite store: one module per aggregate, every call off the event loop."""

from .db import Store

__all__ = ["Store"]
