"""Signals in a command's main thread without a lock in the handler: waiting for SIGINT/SIGTERM,
or acting on signals from a watcher thread."""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from typing import Callable


def _wakeup_socket(signals: tuple[int, ...]) -> tuple[socket.socket, socket.socket]:
    """(read, write) ends of a socket pair; the C-level handler writes each signal's number to
    `write` (`signal.set_wakeup_fd`), whichever thread it runs on, and the Python handlers of
    `signals` do nothing. Call from the main thread."""
    read, write = socket.socketpair()
    write.setblocking(False)
    signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
    for sig in signals:
        signal.signal(sig, lambda *_: None)
    return read, write


class ShutdownSignals:
    """SIGINT and SIGTERM as something the main thread waits on, with a timeout.

    The kernel may hand a process's signal to any of its threads (Reverb's, gRPC's); Python's
    C-level handler then only flags it, and a main thread blocked in `threading.Event.wait`
    runs the Python handler when that wait times out (`pacflow replay serve` waited out its
    600 s checkpoint period after SIGTERM). And a handler calling `Event.set()` can deadlock
    if it runs while the main thread holds that Event's lock. Here the handlers do nothing:
    the C-level handler writes each signal's number to a wakeup socket
    (`signal.set_wakeup_fd`), whichever thread it runs on, and `wait` selects on that socket.
    Create it in the main thread."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self._signals = set(signals)
        self._read, self._write = _wakeup_socket(signals)
        self._read.setblocking(False)
        self.received: int | None = None  # the first of `signals` that came

    def wait(self, timeout: float | None = None) -> bool:
        """True once one of the signals has come (now or before), False after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.received is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._read], [], [], left)[0]:
                return False
            caught = [n for n in self._read.recv(256) if n in self._signals]  # a byte a signal
            self.received = caught[0] if caught else None
        return True


def watch_signals(actions: dict[int, Callable[[], None]]) -> threading.Thread:
    """Runs `actions[signum]()` on a watcher thread each time one of the signals comes, never
    in the signal handler (one that takes a lock the interrupted main thread holds, as
    `Event.set` does, deadlocks the process). Same wakeup-socket way as ShutdownSignals, so use
    one or the other in a process. Call it from the main thread."""
    read, write = _wakeup_socket(tuple(actions))

    def watch() -> None:
        while True:
            for signum in read.recv(256):  # blocks; one byte per signal
                if signum in actions:
                    actions[signum]()

    thread = threading.Thread(target=watch, name="signals", daemon=True)
    thread.sockets = (read, write)  # alive as long as the thread: the wakeup fd stays open
    thread.start()
    return thread
