"""A robot's two background links to the gateway: the uploader, which sends spooled episodes
until each is acknowledged, and the reporter, which sends the robot's status every period.
Both run on their own threads so the control loop never waits on the network
(actors/robot.py)."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable

import grpc

from policies.client import PLAINTEXT, PolicyClient
from policies.limits import is_permanent
from policies.security import ClientSecurity
from replay.archive import EpisodeArchive

if TYPE_CHECKING:
    from actors.robot import RobotStats

log = logging.getLogger(__name__)


# Upload failures that retrying cannot mend: the file moves to <spool>/rejected/ with the reason.
# RESOURCE_EXHAUSTED is one only when the server marks it so (an episode over a size limit);
# otherwise the server is busy (its stream slots or handler threads) and the upload is retried.
PERMANENT_UPLOAD_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                           grpc.StatusCode.UNIMPLEMENTED}


def refused_for_good(error: grpc.RpcError) -> bool:
    """Whether an upload's failure is one retrying cannot mend."""
    code = error.code()
    return code in PERMANENT_UPLOAD_ERRORS or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and is_permanent(error))


class Uploader:
    """Sends spooled episodes to the gateway until each is acknowledged, then deletes it.
    An episode the gateway refuses for good is moved aside (never deleted) so the rest go on."""

    def __init__(self, gateway: str, robot_id: str, spool: EpisodeArchive, retry_seconds: float,
                 stats: RobotStats, security: ClientSecurity = PLAINTEXT):
        self._gateway, self._robot_id = gateway, robot_id
        self._spool, self._retry = spool, retry_seconds
        self._security = security
        self._stats, self._wake, self._stop = stats, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)

    def start(self) -> "Uploader":
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def pending(self) -> int:
        return len(self._spool.paths())

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stops after trying to drain the spool for up to drain_seconds."""
        deadline = time.monotonic() + drain_seconds
        if drain_seconds > 0:
            self.wake()  # one attempt now; failed ones are retried every retry_seconds, not faster
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        client = PolicyClient(self._gateway, timeout=30, security=self._security)
        try:
            while not self._stop.is_set():
                for path in self._spool.paths():
                    try:
                        if not self._upload(client, path):
                            break
                    except Exception:  # keep the thread alive: the spool must drain
                        log.exception("upload of %s failed; retrying", path)
                        break
                self._wake.wait(self._retry)
                self._wake.clear()
        finally:
            client.close()

    def _upload(self, client: PolicyClient, path: str) -> bool:
        """Sends the spooled file's bytes as they are (the archive's per-episode format)."""
        episode_id = os.path.basename(path)[:-len(".parquet")]
        with self._spool.filesystem.open_input_stream(path) as f:
            payload = f.read()
        try:
            reply = client.upload_payload(episode_id, self._robot_id, payload)
        except grpc.RpcError as e:
            if refused_for_good(e):
                self._reject(path, episode_id, f"{e.code().name}: {e.details()}")
                return True
            log.warning("upload of %s failed (%s); retrying", episode_id, e.code())
            return False
        if reply.quarantined:
            log.error("gateway quarantined %s: %s", reply.episode_id, reply.quarantined)
        self._spool.filesystem.delete_file(path)
        self._stats.uploaded += 1
        return True

    def _reject(self, path: str, episode_id: str, reason: str) -> None:
        log.error("gateway refused %s for good (%s); kept in rejected/", episode_id, reason)
        rejected = f"{os.path.dirname(path)}/rejected"
        fs = self._spool.filesystem
        fs.create_dir(rejected)
        fs.move(path, f"{rejected}/{episode_id}.parquet")
        with fs.open_output_stream(f"{rejected}/{episode_id}.reason.txt") as f:
            f.write(reason.encode())
        self._stats.uploads_rejected += 1


class Reporter:
    """Sends the robot's status to the gateway every `period` seconds, and once more at stop.
    Best effort: a gateway that is down is tried again next period; one that keeps no fleet
    (UNIMPLEMENTED, a standalone `pacflow policy serve`) is not asked again."""

    def __init__(self, gateway: str, security: ClientSecurity, period: float,
                 status: Callable[[], dict]):
        self._client = PolicyClient(gateway, timeout=max(period, 1.0), security=security)
        self._period, self._status, self._stop = period, status, threading.Event()
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        self._wanted = True

    def start(self) -> "Reporter":
        self._thread.start()
        return self

    def _send(self) -> None:
        if not self._wanted:
            return
        try:
            self._client.report(**self._status())
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("the gateway keeps no fleet status; not reporting")
                self._wanted = False
        except Exception:  # a report is never worth the robot: log it, try next period
            log.exception("status report failed")

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._send()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._send()  # the last word: e.g. that it was e-stopped
        self._client.close()
