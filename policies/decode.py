"""Decoding uploaded episodes in a helper process whose memory is capped.

Parquet can decode to far more than it stores, and its metadata does not say how much: a
632-byte file written by pyarrow itself (one row holding a list of 250M zeros, dictionary- and
run-length-encoded) decodes to 1 GB, while its row group declares `total_byte_size` 94. A check
on the metadata therefore cannot bound decoding. The gateway decodes every upload in one
helper process (`python -m policies.decode`) whose data segment is capped with RLIMIT_DATA;
an upload that needs more fails there with MemoryError and is refused, and the gateway's own
memory never sees it.

Usage:
    decoder = EpisodeDecoder(max_decoded_bytes=1 << 30)
    episode = decoder.decode("/spool/upload-123")   # WireTooLarge / WireError when refused
    decoder.close()
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading

from policies.wire import WireError, WireTooLarge
from replay.spec import Episode

log = logging.getLogger(__name__)

# The helper's data segment may grow by this much per byte it is allowed to decode, plus
# CAP_BASE_BYTES: decoding a 40 MB list column with pyarrow's system allocator and no threads
# grew it by 209 MB (the column's buffers grow by doubling, then the episode's arrays).
CAP_PER_DECODED_BYTE = 6
CAP_BASE_BYTES = 256 << 20
_OK, _TOO_LARGE, _INVALID, _READY = b"o", b"t", b"i", b"r"
# A helper that has not answered a decode this long is stopped or stuck: it is killed and the
# upload is answered as a helper killed from outside (retry later). Decoding the largest
# allowed upload takes seconds; without a bound, a stopped helper would hold every upload.
REPLY_SECONDS = 120.0
# A new helper says it is ready (pyarrow and numpy imported, cap set) within this long, or it
# is killed; the reply time of the first decode counts from then, so a slow start on a loaded
# machine is not taken for a stuck decode.
START_SECONDS = 120.0


class DecoderStopped(RuntimeError):
    """The helper was killed from outside (SIGKILL or SIGTERM: the gateway's own shutdown, or
    the kernel's OOM killer), not by the upload: the client should retry it later."""


class EpisodeDecoder:
    """One helper process, started on first use and again after it dies; one decode at a time
    (callers wait their turn)."""

    def __init__(self, max_decoded_bytes: int, reply_seconds: float = REPLY_SECONDS):
        self._max, self._reply_seconds = int(max_decoded_bytes), reply_seconds
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False  # the helper has said it is ready (reset by _start)

    def start(self) -> "EpisodeDecoder":
        """Starts the helper now (it imports pyarrow and numpy for a second or two) instead
        of on the first upload; returns at once."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
        return self

    def decode(self, path: str) -> Episode:
        """The episode in the Parquet file at `path`. Raises WireTooLarge when it decodes to
        more than max_decoded_bytes (or needs more memory than the cap), WireError when it is
        not a pacflow episode, DecoderStopped when the helper was killed from outside."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            try:
                self._proc.stdin.write(path.encode() + b"\n")
                self._proc.stdin.flush()
                if not self._ready:
                    self._await(START_SECONDS, "start")
                    # One byte off the pipe itself: a buffered read would take the answer
                    # written right after it too, and the wait below would watch an empty pipe.
                    self._ready = os.read(self._proc.stdout.fileno(), 1) == _READY
                if self._ready:
                    self._await(self._reply_seconds, "answer")
                status, size = self._proc.stdout.read(1), self._proc.stdout.read(8)
                payload = self._proc.stdout.read(struct.unpack("<Q", size)[0]) \
                    if len(size) == 8 else b""
            except (BrokenPipeError, struct.error):
                status, payload = b"", b""
            if status == _OK:
                return pickle.loads(payload)  # written by the helper, from numpy arrays
            if status == _INVALID:
                raise WireError(payload.decode())
            if status == _TOO_LARGE:
                raise WireTooLarge(payload.decode())
            code = self._proc.wait(timeout=30)
            self._proc = None
            if code in (-signal.SIGKILL, -signal.SIGTERM):
                raise DecoderStopped(f"the decoder process was stopped (signal {-code}) while "
                                     "decoding; retry the upload")
            raise WireTooLarge(f"the decoder process died while decoding (exit code {code})")

    def _await(self, seconds: float, what: str) -> None:
        """Waits for the helper's next byte; one stopped or stuck that long is killed (the
        read that follows then ends, and the decode is answered as killed)."""
        if not select.select([self._proc.stdout], [], [], seconds)[0]:
            self._proc.kill()
            log.error("the decoder process did not %s within %g s; killed it", what, seconds)

    def _start(self) -> subprocess.Popen:
        self._ready = False
        cap = CAP_BASE_BYTES + CAP_PER_DECODED_BYTE * self._max
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        return subprocess.Popen([sys.executable, "-m", "policies.decode", str(self._max),
                                 str(cap)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=env)

    def close(self) -> None:
        """Ends the helper; one still decoding after reply_seconds is killed (so a server's
        stop never waits on a stopped helper)."""
        if not self._lock.acquire(timeout=self._reply_seconds):
            proc = self._proc
            if proc is not None:
                proc.kill()  # the decode in progress then fails as killed, and releases
            self._lock.acquire()
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=self._reply_seconds)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        finally:
            self._lock.release()


def episode_nbytes(episode: Episode) -> int:
    """Bytes of the episode's arrays."""
    arrays = (episode.observation, episode.action, episode.reward, episode.discount,
              episode.policy_version, episode.pixels)
    return sum(a.nbytes for a in arrays if a is not None)


def _data_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))


def _decode_one(path: str, max_decoded_bytes: int) -> tuple[bytes, bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from replay.archive import table_to_episode

    try:
        episode = table_to_episode(pq.read_table(path, use_threads=False))
    except MemoryError:  # pyarrow's ArrowMemoryError too
        return _TOO_LARGE, (f"decoding needs more memory than the gateway allows for "
                            f"{max_decoded_bytes} decoded bytes (gateway.max_decoded_bytes)"
                            ).encode()
    except (pa.ArrowException, KeyError, ValueError, TypeError) as e:
        return _INVALID, f"not a pacflow episode ({e})".encode()
    size = episode_nbytes(episode)
    if size > max_decoded_bytes:
        return _TOO_LARGE, (f"decodes to {size} bytes, over the limit of {max_decoded_bytes} "
                            "(gateway.max_decoded_bytes)").encode()
    return _OK, pickle.dumps(episode, protocol=5)


def _serve(max_decoded_bytes: int, cap: int) -> None:
    import pyarrow as pa

    import replay.archive  # noqa: F401  (imported before the cap is measured)

    pa.set_memory_pool(pa.system_memory_pool())  # returns memory to the cap after a refusal
    resource.setrlimit(resource.RLIMIT_DATA, (_data_bytes() + cap, resource.RLIM_INFINITY))
    out = sys.stdout.buffer
    out.write(_READY)
    out.flush()
    for line in sys.stdin.buffer:
        status, payload = _decode_one(line.decode().rstrip("\n"), max_decoded_bytes)
        out.write(status + struct.pack("<Q", len(payload)) + payload)
        out.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
