"""WaveWriter: a wave is written on another thread while the caller goes on, in order, one at a
time, and a failed write surfaces at the next submit or finish."""

import threading

import pytest

from actors.wave_writer import WaveWriter


def test_a_wave_is_written_while_the_caller_acts_the_next():
    acting = threading.Event()  # set by the caller after submit returned
    overlapped = []

    def write(wave):
        overlapped.append(acting.wait(timeout=30))  # a synchronous write would wait it out
        return wave

    writer = WaveWriter(write)
    try:
        assert writer.submit("wave 0", tag=0) == []
        acting.set()  # "acting the next wave"
        (done,) = writer.finish()
        assert (done.tag, done.result, overlapped) == (0, "wave 0", [True])
        assert done.waited >= 0
    finally:
        writer.close()


def test_waves_come_back_in_order_and_one_is_written_at_a_time():
    written, lock = [], threading.Lock()

    def write(wave):
        with lock:
            written.append(wave)
        return wave * 10

    writer = WaveWriter(write)
    try:
        results = []
        for i in range(5):
            results += writer.submit(i, tag=f"w{i}")
            # submit hands wave i over only after wave i-1 is written: at most one pending
            with lock:
                assert written[:i] == list(range(i)) and len(written) in (i, i + 1)
        results += writer.finish()
        assert [(d.tag, d.result) for d in results] == [(f"w{i}", 10 * i) for i in range(5)]
        assert writer.finish() == []
    finally:
        writer.close()


def test_a_failed_write_is_raised_by_the_next_submit_which_writes_nothing():
    written = []

    def write(wave):
        if wave == 1:
            raise OSError("disk full")
        written.append(wave)
        return wave

    writer = WaveWriter(write)
    try:
        writer.submit(0)
        writer.submit(1)
        with pytest.raises(OSError, match="disk full"):
            writer.submit(2)
        assert written == [0]  # wave 2 was not handed over
        assert writer.finish() == []
        writer.submit(3)  # the writer goes on for the caller's next call
        writer.submit(4)
        writer.discard()  # a failed call's leftover wave: waited for, dropped
        assert written == [0, 3, 4] and writer.finish() == []
    finally:
        writer.close()


def test_discard_drops_a_pending_error():
    writer = WaveWriter(lambda wave: 1 / 0)
    try:
        writer.submit("wave")
        writer.discard()
        assert writer.finish() == []
    finally:
        writer.close()
