"""Process helpers for the tests that kill a Ray worker (no tests here)."""

from __future__ import annotations

import os
import pathlib


def session_worker_pids(name: bytes = b"ModelWorker") -> list[int]:
    """Pids of this test session's model-worker processes: descendants of this process (the
    local Ray started by the session fixture) whose command line names the actor class, so a
    test never kills another session's workers."""
    parent: dict[int, int] = {}
    cmd: dict[int, bytes] = {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd[int(d.name)] = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                pass
    me = os.getpid()

    def mine(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parent.get(pid, 0)
            if pid == me:
                return True
        return False

    return sorted(p for p, c in cmd.items() if name in c and mine(p))
