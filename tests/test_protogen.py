"""The generated code in aria_trio/proto is what `just proto` makes from proto/ now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    out = tmp_path / "proto"
    subprocess.run([sys.executable, str(ROOT / "tools" / "protogen.py"), "--out", str(out)], check=True)
    checked_in = ROOT / "aria_trio" / "proto"

    def files(base):
        return {p.relative_to(base) for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    assert files(out) == files(checked_in), "run `just proto`: generated files were added or removed"
    stale = [str(p) for p in sorted(files(out)) if not filecmp.cmp(out / p, checked_in / p, shallow=False)]
    assert not stale, f"run `just proto`: stale generated code in {stale}"


def test_contract_numbers_are_kept():
    """Spot checks of CONTRACT.md's field numbers, through the generated descriptors."""
    from aria_trio.proto.aria.v1 import container_pb2, notification_pb2, task_pb2, user_preference_pb2

    task = task_pb2.Task.DESCRIPTOR.fields_by_name
    assert (task["status"].number, task["progress_percent"].number, task["current_operation"].number) == (10, 16, 17)
    assert task_pb2.LaunchTaskRequest.DESCRIPTOR.fields_by_name["parent_task_id"].number == 6
    assert container_pb2.CreateContainerRequest.DESCRIPTOR.fields_by_name["command"].number == 6
    assert container_pb2.ContainerLog.Stream.Value("STDERR") == 2
    assert notification_pb2.Notification.DESCRIPTOR.fields_by_name["task_status"].number == 4
    assert user_preference_pb2.UpdateUserPreferencesRequest.DESCRIPTOR.fields_by_name["updates"].number == 1
