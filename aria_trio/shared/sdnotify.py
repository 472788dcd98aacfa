"""systemd's readiness protocol: a datagram to $NOTIFY_SOCKET (READY=1, STOPPING=1, STATUS=...)."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("aria.sdnotify")


def notify(message: str) -> bool:
    """Send `message` when running under a supervisor that asked for it; False otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)  # a datagram on a local socket: does not block
    except OSError as exc:
        log.warning("could not notify the supervisor", error=str(exc))
        return False
    return True
