"""Real Unix users for the tests that need more than one caller (the tests run as root, as CI does)."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


NAMES = ("aria-test-a", "aria-test-b")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_users() -> dict[str, User]:
    """aria-test-a (in group aria-test-g) and aria-test-b, made afresh."""
    if os.getuid() != 0:
        raise RuntimeError("these tests make Unix users: run them as root (CI does)")
    remove_users()  # left over from an interrupted run
    _run("groupadd", "aria-test-g")
    _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", "aria-test-g", NAMES[0])
    _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", NAMES[1])
    return {n: User(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid) for n in NAMES}


def remove_users() -> None:
    for name in NAMES:
        subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", "aria-test-g"], capture_output=True)


def group_id(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def open_path_to(socket: Path) -> None:
    """Let others traverse the folders above the socket (the test's own temp folder is 0700)."""
    for folder in (socket.parent.parent,):
        folder.chmod(0o711)
