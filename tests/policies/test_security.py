"""The security matrix against a real TLS policy server on a free loopback port: every wrong
credential is refused with a reason, the right ones succeed."""

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from policies.certs import generate_dev_credentials
from policies.client import PolicyClient, PolicySubscriber
from policies.perceiver import PerceiverActorCritic
from policies.proto import policy_pb2 as pb
from policies.security import ClientSecurity, SecurityError, ServerSecurity, load_tokens, \
    pack_client_security, token_digest, unpack_client_security
from policies.server import PolicyServer
from policies.snapshot import Snapshot, snapshot_metadata
from replay.archive import EpisodeArchive
from replay.ingest import EpisodeSink
from tests.fakes import SPEC, TINY_MODEL, make_episode

CLIENTS = ["learner", "actor", "operator", "robot-1", "robot-2"]


def _snapshot(version: int) -> Snapshot:
    torch.manual_seed(version)
    net = PerceiverActorCritic(SPEC, TINY_MODEL)
    return Snapshot.from_state_dict(version, net.state_dict(),
                                    snapshot_metadata(SPEC.to_dict(), TINY_MODEL, 0, 0, 0))


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    good = tmp_path_factory.mktemp("creds")
    rogue = tmp_path_factory.mktemp("rogue")
    generate_dev_credentials(good, CLIENTS)
    generate_dev_credentials(rogue, ["robot-1"])  # same names, another CA
    return good, rogue


@pytest.fixture()
def mtls_server(creds, tmp_path):
    good, _ = creds
    sink = EpisodeSink(SPEC, EpisodeArchive(tmp_path / "archive"), None, tmp_path / "quarantine")
    server = PolicyServer(tmp_path / "policies", port=0, security=ServerSecurity.from_dir(good),
                          episode_handler=lambda e: sink.ingest(e, to_replay=False))
    address = server.start()
    yield address, good
    server.stop()


def _robot_episode(robot_id: str):
    episode = make_episode()
    return dataclasses.replace(episode, lineage=dataclasses.replace(episode.lineage,
                                                                    actor_id=robot_id))


def _client(address: str, security: ClientSecurity) -> PolicyClient:
    return PolicyClient(address, timeout=5, security=security)


def _refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_the_right_credentials_succeed_for_each_role(mtls_server):
    address, good = mtls_server
    with _client(address, ClientSecurity.from_dir(good, "learner")) as learner:
        assert learner.publish(_snapshot(1)) == 1
    with _client(address, ClientSecurity.from_dir(good, "operator")) as operator:
        assert operator.pin(1, client_id="robot-1").client_pins["robot-1"] == 1
    robot = ClientSecurity.from_dir(good, "robot-1")
    with _client(address, robot) as client:
        assert client.fetch(1).version == 1
        action, version = client.act(np.zeros(SPEC.obs_dim, np.float32))
        assert version == 1 and action.shape == (SPEC.action_dim,)
        episode = _robot_episode("robot-1")
        assert client.upload_episode(episode).stored
    subscriber = PolicySubscriber(address, "robot-1", security=robot).start()
    try:
        assert subscriber.wait_for_version(1, timeout=20).version == 1
    finally:
        subscriber.close()


def test_plaintext_wrong_ca_and_missing_client_certificate_fail_the_handshake(mtls_server,
                                                                              creds):
    address, good = mtls_server
    _, rogue = creds
    robot = ClientSecurity.from_dir(good, "robot-1")
    cases = {
        "plaintext": ClientSecurity(),
        "wrong CA": dataclasses.replace(robot, ca_file=str(rogue / "ca.pem")),
        "no client certificate": dataclasses.replace(robot, cert_file="", key_file=""),
        "certificate from another CA": ClientSecurity.from_dir(rogue, "robot-1"),
    }
    for name, security in cases.items():
        if not security.ca_file:  # gRPC sends tokens only over TLS: plaintext goes without
            security = dataclasses.replace(security, token_file="")
        with _client(address, security) as client:
            details = _refused(client.list, grpc.StatusCode.UNAVAILABLE)
            assert details, name
        with _client(address, robot) as client:  # the same server, up, takes the right ones
            assert client.list().versions == [], name


def test_missing_or_unknown_token_is_unauthenticated(mtls_server, tmp_path):
    address, good = mtls_server
    robot = ClientSecurity.from_dir(good, "robot-1")
    with _client(address, dataclasses.replace(robot, token_file="")) as client:
        assert "missing bearer token" in _refused(client.list, grpc.StatusCode.UNAUTHENTICATED)
    forged = tmp_path / "forged.token"
    forged.write_text("not-a-token")
    with _client(address, dataclasses.replace(robot, token_file=str(forged))) as client:
        assert "unknown or revoked bearer token" in _refused(client.list,
                                                  grpc.StatusCode.UNAUTHENTICATED)


def test_wrong_role_and_borrowed_identity_are_permission_denied(mtls_server):
    address, good = mtls_server
    robot = ClientSecurity.from_dir(good, "robot-1")
    with _client(address, robot) as client:
        details = _refused(lambda: client.publish(_snapshot(1)),
                           grpc.StatusCode.PERMISSION_DENIED)
        assert "role 'robot'" in details and "Publish" in details
        _refused(lambda: client.pin(1), grpc.StatusCode.PERMISSION_DENIED)
    with _client(address, ClientSecurity.from_dir(good, "learner")) as learner:
        learner.publish(_snapshot(1))
        _refused(lambda: learner.fetch(1), grpc.StatusCode.PERMISSION_DENIED)
    # robot-1's token with robot-2's certificate: the token is bound to its certificate.
    robot2 = ClientSecurity.from_dir(good, "robot-2")
    mixed = dataclasses.replace(robot2, token_file=robot.token_file)
    with _client(address, mixed) as client:
        assert "certificate" in _refused(client.list, grpc.StatusCode.PERMISSION_DENIED)
    # robot-1 may not upload episodes in robot-2's name.
    with _client(address, robot) as client:
        details = _refused(lambda: client.upload_episode(_robot_episode("robot-2")),
                           grpc.StatusCode.PERMISSION_DENIED)
        assert "robot-2" in details


def test_tls_without_client_certificates_still_checks_tokens(creds, tmp_path):
    good, _ = creds
    server = PolicyServer(tmp_path / "policies", port=0,
                          security=ServerSecurity.from_dir(good, mtls=False))
    address = server.start()
    try:
        token_only = dataclasses.replace(ClientSecurity.from_dir(good, "learner"),
                                         cert_file="", key_file="")
        with _client(address, token_only) as client:
            assert client.publish(_snapshot(1)) == 1
        no_token = dataclasses.replace(token_only, token_file="")
        with _client(address, no_token) as client:
            _refused(client.list, grpc.StatusCode.UNAUTHENTICATED)
    finally:
        server.stop()


def test_plaintext_is_only_for_loopback_and_only_when_allowed(tmp_path, creds):
    with pytest.raises(SecurityError, match="loopback"):
        PolicyServer(tmp_path / "p", host="0.0.0.0", security=ServerSecurity(allow_plaintext=True))
    with pytest.raises(SecurityError, match="allow_plaintext"):
        PolicyServer(tmp_path / "p", host="127.0.0.1", security=ServerSecurity())
    with pytest.raises(SecurityError, match="tokens_file: required with TLS"):
        PolicyServer(tmp_path / "p", security=dataclasses.replace(
            ServerSecurity.from_dir(creds[0]), tokens_file=""))
    with pytest.raises(SecurityError, match="need TLS"):
        PolicyServer(tmp_path / "p", security=ServerSecurity(
            allow_plaintext=True, tokens_file=str(creds[0] / "tokens.yaml")))


def test_tokens_file_holds_digests_and_roles(creds):
    good, _ = creds
    entries = {e.identity: e for e in load_tokens(str(good / "tokens.yaml"))}
    assert {i: e.role for i, e in entries.items()} == {
        "learner": "learner", "actor": "actor", "operator": "operator", "robot-1": "robot",
        "robot-2": "robot"}
    token = (good / "clients" / "robot-1.token").read_text()
    assert token not in (good / "tokens.yaml").read_text()
    assert (good / "clients" / "robot-1.key").stat().st_mode & 0o077 == 0


def test_robots_subscribe_and_act_only_as_themselves_operators_for_anyone(mtls_server):
    """Before, Subscribe and Act trusted request.client_id: robot-1 could run robot-2's pin."""
    address, good = mtls_server
    with _client(address, ClientSecurity.from_dir(good, "learner")) as learner:
        learner.publish(_snapshot(1))
        learner.publish(_snapshot(2))
    with _client(address, ClientSecurity.from_dir(good, "operator")) as operator:
        operator.pin(1, client_id="robot-2")
        assert operator.act(np.zeros(SPEC.obs_dim), client_id="robot-2")[1] == 1
    robot1 = ClientSecurity.from_dir(good, "robot-1")
    with _client(address, robot1) as client:
        details = _refused(lambda: client.act(np.zeros(SPEC.obs_dim), client_id="robot-2"),
                           grpc.StatusCode.PERMISSION_DENIED)
        assert "'robot-1' may not act as client 'robot-2'" in details
        assert client.act(np.zeros(SPEC.obs_dim))[1] == 2  # no id: itself, unpinned
    with _client(address, ClientSecurity.from_dir(good, "robot-2")) as client:
        assert client.act(np.zeros(SPEC.obs_dim))[1] == 1  # its own pin, from its identity
    with _client(address, robot1) as client:  # the stream is refused before it sends a byte
        details = _refused(lambda: next(client._stub.Subscribe(
            pb.SubscribeRequest(client_id="robot-2"), **client._call)),
            grpc.StatusCode.PERMISSION_DENIED)
        assert "may not act as client 'robot-2'" in details


def test_empty_or_unsafe_token_identities_are_refused(tmp_path, creds):
    for identity in ["", "../robot", "a b"]:
        path = tmp_path / "tokens.yaml"
        entry = f"{{sha256: {'0' * 64}, role: robot, identity: '{identity}'}}"
        path.write_text(f"tokens:\n  - {entry}\n")
        with pytest.raises(SecurityError, match=r"tokens\[0\]\.identity"):
            load_tokens(str(path))
        security = dataclasses.replace(ServerSecurity.from_dir(creds[0]), tokens_file=str(path))
        with pytest.raises(SecurityError, match=r"tokens\[0\]\.identity"):
            PolicyServer(tmp_path / "policies", port=0, security=security)  # does not start


def test_tokens_are_revoked_without_a_restart(creds, tmp_path):
    good, _ = creds
    tokens = tmp_path / "tokens.yaml"
    original = (good / "tokens.yaml").read_text()
    tokens.write_text(original)
    security = dataclasses.replace(ServerSecurity.from_dir(good), tokens_file=str(tokens))
    server = PolicyServer(tmp_path / "policies", port=0, security=security)
    address = server.start()
    robot1 = ClientSecurity.from_dir(good, "robot-1")
    robot2 = ClientSecurity.from_dir(good, "robot-2")
    try:
        with _client(address, robot1) as c1, _client(address, robot2) as c2:
            assert c1.list().versions == [] and c2.list().versions == []
            tokens.write_text(original + "revoked:\n  - robot-1\n")
            assert "revoked" in _refused(c1.list, grpc.StatusCode.UNAUTHENTICATED)
            c2.list()  # the others keep working
            digest = token_digest((good / "clients" / "robot-2.token").read_text().strip())
            tokens.write_text(original + f"revoked:\n  - robot-1\n  - {digest}\n")
            _refused(c2.list, grpc.StatusCode.UNAUTHENTICATED)
            tokens.write_text("tokens: [not, a, mapping")  # broken: fail closed, say why
            assert "not valid YAML" in _refused(c2.list, grpc.StatusCode.UNAVAILABLE)
            tokens.write_text(original)
            c1.list()
            c2.list()
    finally:
        server.stop()


def test_packed_credentials_carry_one_identity_and_connect(mtls_server, tmp_path):
    """What the driver sends a run's process: that identity's files as bytes, written 0600 to
    the process's own scratch, and enough to pass the mTLS handshake and the token check."""
    address, good = mtls_server
    packed = pack_client_security(ClientSecurity.from_dir(good, "robot-1"))
    assert sorted(packed) == ["ca_file", "cert_file", "key_file", "token_file"]
    assert packed["key_file"] == (good / "clients" / "robot-1.key").read_bytes()
    security = unpack_client_security(packed, tmp_path / "mine")
    assert (tmp_path / "mine").stat().st_mode & 0o077 == 0
    assert all(Path(getattr(security, f)).stat().st_mode & 0o077 == 0 for f in packed)
    with _client(address, security) as client:
        assert client.list().versions == []
    assert unpack_client_security({}, tmp_path / "none") == ClientSecurity()


def test_robots_report_only_as_themselves(creds, tmp_path):
    """Report, the robots' status call: only the robot role, only under its own identity; a
    server that keeps no fleet answers UNIMPLEMENTED."""
    good, _ = creds
    reports = []
    server = PolicyServer(tmp_path / "policies", port=0, security=ServerSecurity.from_dir(good),
                          status_handler=reports.append)
    address = server.start()
    status = {"acting_version": 3, "spool_depth": 2, "episodes": 5, "uploaded": 3,
              "safe_idle_entries": 1, "estopped": False}
    try:
        with _client(address, ClientSecurity.from_dir(good, "robot-1")) as robot:
            robot.report(robot_id="robot-1", **status)
            details = _refused(lambda: robot.report(robot_id="robot-2", **status),
                               grpc.StatusCode.PERMISSION_DENIED)
            assert "'robot-1' may not act as client 'robot-2'" in details
        with _client(address, ClientSecurity.from_dir(good, "learner")) as learner:
            details = _refused(lambda: learner.report(robot_id="robot-1", **status),
                               grpc.StatusCode.PERMISSION_DENIED)
            assert "may not call Report" in details
    finally:
        server.stop()
    assert reports == [{"robot_id": "robot-1", **status}]
    plain = PolicyServer(tmp_path / "plain", port=0)  # the standalone kind, without a fleet
    address = plain.start()
    try:
        with PolicyClient(address, timeout=5) as robot:
            _refused(lambda: robot.report(robot_id="robot-1", **status),
                     grpc.StatusCode.UNIMPLEMENTED)
    finally:
        plain.stop()
