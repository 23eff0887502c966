"""Fixtures shared across packages: a real S3 server (moto's) on loopback. And how `make test`
deals the tests out to its two pytest-xdist workers."""

import logging
import uuid

import pyarrow.fs as pafs
import pytest

# `make test` runs two pytest-xdist workers. The tests that start Ray clusters, time
# benchmarks or run whole systems compete for the 2 cores with timeouts of their own: one
# worker runs them all, in order (run in parallel, two whole-system tests each took twice as
# long and two of them timed out). The other tests run beside them on the other worker.
SERIAL = ("tests/integration/", "tests/reliability/", "tests/cluster/test_cli.py",
          "tests/cluster/test_ddp.py", "tests/cluster/test_bench",
          "tests/cluster/test_replay_serve")


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with one scope for every SERIAL test and one per other test
    (xdist's own loadgroup does not see groups under pytest 9: it renames `item._nodeid`)."""
    from xdist.scheduler import LoadScopeScheduling

    class SerialScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "serial" if nodeid.startswith(SERIAL) else nodeid

    return SerialScope(config, log)


BUCKET = "pacflow-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def s3_environment(endpoint: str) -> dict[str, str]:
    """What an operator exports so that pyarrow (and so pacflow) reaches this S3 endpoint."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://{endpoint}",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def endpoint():
    """host:port of a moto S3 server on 127.0.0.1 (a free port) holding an empty bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    address = f"{host}:{port}"
    admin = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                              endpoint_override=address, scheme="http",
                              allow_bucket_creation=True)
    admin.create_dir(BUCKET)
    yield address
    server.stop()


@pytest.fixture
def s3_prefix(endpoint, monkeypatch):
    """(s3:// URI of a fresh prefix in the bucket, a filesystem for looking at it directly),
    with this process's environment pointing pyarrow at the moto server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment(endpoint).items():
        monkeypatch.setenv(name, value)
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", fs
