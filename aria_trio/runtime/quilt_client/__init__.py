"""The runtime's client of Quilt: the link that keeps Quilt up and connected (link.py), and one
typed method per call, where Quilt's errors become the domain's (calls.py)."""

from aria_trio.runtime.quilt_client.calls import QuiltCalls, Replies, as_domain_error
from aria_trio.runtime.quilt_client.link import HEALTHY_S, MAX_CONNECTIONS, QuiltLink, WrongQuilt, quilt_command

__all__ = [
    "HEALTHY_S",
    "MAX_CONNECTIONS",
    "QuiltCalls",
    "QuiltLink",
    "Replies",
    "WrongQuilt",
    "as_domain_error",
    "quilt_command",
]
