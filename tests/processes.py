"""Finding and waiting for the real processes that fault tests kill."""

import time
from pathlib import Path

import pytest


def until(condition, what: str, timeout: float = 300.0, poll: float = 0.1):
    """Polls `condition` (returning a truthy value) until it holds; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def ray_pids(title: str, home: str) -> list[int]:
    """This test's Ray worker processes (their HOME is the test's) whose title
    (`ray::Class.method` while busy, `ray::Class` while idle) starts with `title`. Other Ray
    clusters on the machine are left alone."""
    mine = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone already, or not ours to read
            continue
        if cmdline.startswith(title.encode()) and f"HOME={home}".encode() in environ:
            mine.append(int(proc.name))
    return mine
