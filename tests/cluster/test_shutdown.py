"""ShutdownSignals: a command's main thread waits for SIGINT/SIGTERM without a deadlock-prone
handler; real child processes get real signals at moments drawn from a seeded RNG."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import signal, sys, threading
from cluster.shutdown import ShutdownSignals
stop = ShutdownSignals()
if sys.argv[1] == "other-thread":  # the kernel can only deliver them to another thread
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
print("ready", flush=True)
if sys.argv[1] == "late":  # the signal comes before the first wait
    sys.stdin.readline()
    print("waited" if stop.wait(30) else "timed out", stop.received, flush=True)
else:
    timeouts = 0
    while not stop.wait(0.005 if sys.argv[1] == "loop" else 600):
        timeouts += 1
    print("stopped", stop.received, timeouts, flush=True)
"""


def _child(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_any_moment_of_the_wait_loop_stops_it(sig):
    rng = random.Random(20261203)
    for trial in range(12):
        proc = _child("loop")
        delay = 0.0 if trial < 4 else rng.uniform(0, 0.05)  # at once: as the wait begins
        time.sleep(delay)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)  # the old Event-based wait could hang here
        assert proc.returncode == 0, (trial, delay, out)
        word, received, timeouts = out.split()
        assert (word, int(received)) == ("stopped", sig)


def test_a_signal_before_the_wait_is_kept_and_a_wait_without_one_times_out():
    proc = _child("late")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate("go\n", timeout=20)
    assert proc.returncode == 0 and out.split() == ["waited", str(int(signal.SIGTERM))]
    proc = _child("loop")
    time.sleep(0.2)  # several 5 ms waits time out first
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert int(out.split()[2]) > 0, out


def test_a_signal_caught_by_another_thread_ends_a_long_wait():
    """As in `pacflow replay serve`, whose Reverb and gRPC threads may be the ones the kernel
    hands SIGTERM to: the main thread's wait (600 s) must end at once, not at its timeout (the
    Event-based wait this replaced hung here)."""
    proc = _child("other-thread")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and out.split() == ["stopped", str(int(signal.SIGTERM)), "0"]


WATCHER = """
import signal, sys, threading
from cluster.shutdown import watch_signals
pulse, stop, count = threading.Event(), threading.Event(), [0]
def estop():  # as `pacflow robot`'s SIGUSR1: an Event.set, which takes the Event's lock
    count[0] += 1
    pulse.set()
if sys.argv[1] == "watcher":
    watch_signals({signal.SIGUSR1: estop, signal.SIGTERM: stop.set})
else:  # the old way: the handlers themselves set the Events
    signal.signal(signal.SIGUSR1, lambda *_: estop())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
print("ready", flush=True)
while not stop.is_set():  # a control loop that holds the Events' locks much of the time
    pulse.wait(0.0001)
    pulse.clear()
print("stopped", count[0], flush=True)
"""


def test_signals_acted_on_by_a_watcher_thread_never_deadlock_the_main_loop():
    """`pacflow robot`'s SIGUSR1 (e-stop) and SIGTERM: bursts of signals at moments drawn from
    a seeded RNG while the main thread keeps taking the lock the actions take. A handler that
    sets the Event itself can interrupt the main thread while it holds that lock and hang."""
    rng = random.Random(20261204)
    for trial in range(6):  # the old way hung in 3 of 10 such trials
        proc = subprocess.Popen([sys.executable, "-c", WATCHER, "watcher"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline() == "ready\n"
        for _ in range(300):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(rng.uniform(0, 0.002))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, (trial, out)
        word, count = out.split()
        assert word == "stopped" and int(count) >= 1, out  # signals of a kind may coalesce


TERMINATED = """
import os, signal
from cluster import driver
signal.signal(signal.SIGTERM, driver._terminated)  # as run_experiment installs it
def module_init():  # a C extension's init turns the handler's SystemExit into ImportError
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10 ** 6):
            pass
    except SystemExit as e:
        raise ImportError("initialization failed") from e
try:
    module_init()
except BaseException as e:
    print(type(e).__name__, flush=True)
    raise driver.termination(e) from e
"""


def test_a_run_terminated_inside_an_import_still_exits_143():
    """`ray job stop` during a run's first report (matplotlib's ft2font initialising) made the
    driver exit 1 with ImportError instead of 143: whatever the handler's SystemExit surfaces
    as, the run ends with 128 + the signal. Other errors stay what they are."""
    from cluster.driver import termination

    proc = subprocess.run([sys.executable, "-c", TERMINATED], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stdout == "ImportError\n"  # what surfaced, as in the run that exited 1
    error = ValueError("storage unreachable")
    assert termination(error) is error  # no signal received in this process
