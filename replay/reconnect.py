"""Finding a Reverb server again after Ray restarted it.

A restarted server may come back at another address (another port, or another node), and even
at the same address it no longer holds what a client had in flight. Each server incarnation
announces `(address, incarnation id)` through a resolver (the run's `addresses/<name>.json`,
written by `cluster/process.py`); a client whose call failed asks it whether the server is a new
one, and if so reconnects and redoes its work.
"""

from __future__ import annotations

import time
from typing import Callable

Resolver = Callable[[], "tuple[str, str] | None"]  # -> (address, incarnation id), or None


def announced(resolve: Resolver | None, address: str) -> tuple[str, str | None]:
    """(address, incarnation) a client starts with: the announced ones when there are any
    (a client may be built with an address that is no longer current), else `address`."""
    found = resolve() if resolve is not None else None
    return found if found is not None else (address, None)


def server_answers(address: str, timeout_seconds: float) -> bool:
    """Whether a Reverb server at `address` answers a server_info call in time."""
    import reverb

    try:
        reverb.Client(address).server_info(timeout=max(int(timeout_seconds), 1))
        return True
    except Exception:  # deadline, unavailable: nobody answering there
        return False


def wait_until_answers(address: str, timeout_seconds: float) -> bool:
    """Polls until a Reverb server answers at `address`; False after `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if server_answers(address, 1.0):
            return True
        time.sleep(0.5)
    return False


def new_incarnation(resolve: Resolver, incarnation: str | None, address: str,
                    timeout_seconds: float) -> tuple[str, str] | None:
    """Waits up to `timeout_seconds` for a server other than `incarnation` to answer; returns
    its (address, incarnation). None when the old one still answers (it is alive: the failure
    was something else) or nothing new answers in time."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        found = resolve()
        if found is not None and found[1] != incarnation and server_answers(found[0], 1.0):
            return found
        if (found is None or found[1] == incarnation) and server_answers(address, 1.0):
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)  # Ray is starting the new server: poll its announcement
