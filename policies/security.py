"""Who may call the policy service: TLS / mutual TLS from certificate files, bearer tokens with
roles, and the rule that plaintext is only for loopback and only when explicitly allowed.

Roles (a token has exactly one):
    learner   Publish
    actor     Subscribe, Fetch, UploadEpisode, Act   (sim actors inside the cluster)
    robot     Subscribe, Fetch, UploadEpisode, Act, Report   (robot clients outside it)
    operator  Pin, Unpin, Fetch, Subscribe, Act   (Subscribe and Act for any client id)
List is read-only and open to every role. A token also names an identity (e.g. "robot-7", a
`replay.ids` name, never empty); with client certificates the certificate's common name must be
that identity, so a stolen token is useless without the robot's key. A robot uploads episodes
only under its own id, and subscribes and acts only as itself (`bound_client_id`).

The tokens file stores sha256 digests, never the tokens themselves (reliability.md §3.1). It is
read again whenever it changes on disk, so a token is revoked by deleting its entry or listing
its digest or identity under `revoked`, without a restart:
    tokens:
      - {sha256: <hex digest of the token>, role: robot, identity: robot-7}
    revoked:
      - robot-3                     # an identity: every token of it
      - <hex digest of a token>     # one token
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import Callable, NamedTuple

import grpc
import yaml

from replay.ids import check_name, name_problem

log = logging.getLogger(__name__)

ROLES = ("learner", "actor", "robot", "operator")
ROLE_METHODS = {
    "learner": frozenset({"Publish", "List"}),
    "actor": frozenset({"Subscribe", "Fetch", "UploadEpisode", "Act", "List"}),
    "robot": frozenset({"Subscribe", "Fetch", "UploadEpisode", "Act", "List", "Report"}),
    "operator": frozenset({"Pin", "Unpin", "Fetch", "List", "Subscribe", "Act"}),
}
# Roles whose Subscribe and Act may name another client id (robots only ever act as themselves).
ACTS_FOR_OTHERS = frozenset({"operator", "actor"})


class Caller(NamedTuple):
    identity: str  # the token's identity, e.g. "robot-7"
    role: str  # one of ROLES


# The authenticated caller while a handler runs (None when tokens are off); see `caller`.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("pacflow_caller",
                                                                        default=None)


class SecurityError(ValueError):
    """A security setting that cannot be used (the message names the setting)."""


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    """How the policy server authenticates its callers (paths to PEM files)."""

    cert_file: str = ""  # server certificate chain; "" = plaintext
    key_file: str = ""  # the server certificate's private key
    client_ca_file: str = ""  # require client certificates signed by this CA (mTLS); "" = none
    tokens_file: str = ""  # YAML list of token digests with role and identity; "" = no tokens
    allow_plaintext: bool = False  # permit plaintext; only ever on a loopback address

    @staticmethod
    def from_dir(directory: str | Path, mtls: bool = True) -> "ServerSecurity":
        """The layout `pacflow policy gen-certs DIR` writes."""
        d = Path(directory)
        return ServerSecurity(str(d / "server.pem"), str(d / "server.key"),
                              str(d / "ca.pem") if mtls else "", str(d / "tokens.yaml"))

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """How a client proves itself to the policy server (paths to PEM files)."""

    ca_file: str = ""  # CA that signed the server's certificate; "" = plaintext
    cert_file: str = ""  # this client's certificate (mTLS); "" = none
    key_file: str = ""  # its private key
    token_file: str = ""  # file holding this client's bearer token; "" = none
    server_name: str = ""  # name to check in the server certificate ("" = the address's host)

    @staticmethod
    def from_dir(directory: str | Path, identity: str) -> "ClientSecurity":
        """Credentials of `identity` in the layout `pacflow policy gen-certs DIR` writes."""
        d = Path(directory)
        return ClientSecurity(str(d / "ca.pem"), str(d / "clients" / f"{identity}.pem"),
                              str(d / "clients" / f"{identity}.key"),
                              str(d / "clients" / f"{identity}.token"))


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"{setting}: cannot read {path}: {e.strerror or e}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_credentials(security: ServerSecurity, host: str) -> grpc.ServerCredentials | None:
    """TLS credentials, or None for plaintext (refused unless loopback and allowed)."""
    if not security.tls:
        if not (security.allow_plaintext and is_loopback(host)):
            raise SecurityError(
                f"policy server on {host}: plaintext needs a loopback address and "
                "allow_plaintext; otherwise set cert_file and key_file")
        return None
    key_cert = (_read(security.key_file, "key_file"), _read(security.cert_file, "cert_file"))
    ca = _read(security.client_ca_file, "client_ca_file") if security.client_ca_file else None
    return grpc.ssl_server_credentials([key_cert], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(security: ClientSecurity) -> grpc.ChannelCredentials | None:
    """TLS (+ client certificate, + bearer token) credentials, or None for plaintext."""
    if not security.ca_file:
        if security.token_file:
            raise SecurityError("token_file: a bearer token is only sent over TLS; set ca_file")
        return None
    cert = _read(security.cert_file, "cert_file") if security.cert_file else None
    key = _read(security.key_file, "key_file") if security.key_file else None
    creds = grpc.ssl_channel_credentials(_read(security.ca_file, "ca_file"), key, cert)
    if security.token_file:
        token = _read(security.token_file, "token_file").decode().strip()
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token))
    return creds


CLIENT_FILES = ("ca_file", "cert_file", "key_file", "token_file")


def pack_client_security(security: ClientSecurity) -> dict[str, bytes]:
    """The files a client's credentials name, read into memory ({field: content}): what one
    process of a run receives from the driver, instead of the path of the whole credentials
    folder (which also holds every other client's key and token)."""
    return {name: _read(getattr(security, name), name) for name in CLIENT_FILES
            if getattr(security, name)}


def unpack_client_security(packed: dict[str, bytes], directory: str | Path) -> ClientSecurity:
    """Writes packed credentials to `directory` (created 0700, files 0600) on this node and
    returns a ClientSecurity naming them; plaintext when `packed` is empty."""
    if not packed:
        return ClientSecurity()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = {}
    for name, content in packed.items():
        path = d / name.removesuffix("_file")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        paths[name] = str(path)
    return ClientSecurity(**paths)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    digest: str  # sha256 hex of the token
    role: str  # one of ROLES
    identity: str  # e.g. "robot-7"; must equal the client certificate's CN under mTLS


def load_tokens(path: str) -> list[TokenEntry]:
    """Parses a tokens file; every problem names the entry. Revoked tokens (by digest or by
    identity, under `revoked`) are left out."""
    try:
        data = yaml.safe_load(_read(path, "tokens_file")) or {}
    except yaml.YAMLError as e:
        raise SecurityError(f"tokens_file {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SecurityError(f"tokens_file {path}: expected a mapping with `tokens`")
    revoked = data.get("revoked") or []
    if not isinstance(revoked, list):
        raise SecurityError(f"tokens_file {path}: revoked must be a list of identities or "
                            "token digests")
    revoked = {str(r) for r in revoked}
    entries = []
    for i, item in enumerate(data.get("tokens") or []):
        if not isinstance(item, dict) or not {"sha256", "role", "identity"} <= set(item):
            raise SecurityError(f"tokens_file {path}: tokens[{i}] needs sha256, role, identity")
        if item["role"] not in ROLES:
            raise SecurityError(f"tokens_file {path}: tokens[{i}].role {item['role']!r} is not "
                                f"one of {', '.join(ROLES)}")
        problem = name_problem(item["identity"], f"tokens[{i}].identity")
        if problem:  # an empty identity would skip every owner check
            raise SecurityError(f"tokens_file {path}: {problem}")
        entry = TokenEntry(str(item["sha256"]), item["role"], item["identity"])
        if entry.digest not in revoked and entry.identity not in revoked:
            entries.append(entry)
    if not data.get("tokens"):
        raise SecurityError(f"tokens_file {path}: no tokens")
    return entries


def caller() -> Caller | None:
    """The authenticated caller of the current call (None when tokens are off)."""
    return _CALLER.get()


def caller_identity() -> str:
    """The authenticated identity of the current call ("" when tokens are off)."""
    found = _CALLER.get()
    return "" if found is None else found.identity


def bound_client_id(requested: str) -> str:
    """The client id a Subscribe or Act call runs as. A robot runs as its own identity (an
    empty request means itself); operators and in-cluster actors may name any valid client id.
    Raises PermissionError, or InvalidIdError for an id that is not a `replay.ids` name."""
    who = _CALLER.get()
    if requested:
        check_name(requested, "client_id")
    if who is None or who.role in ACTS_FOR_OTHERS:
        return requested
    if requested and requested != who.identity:
        raise PermissionError(f"{who.identity!r} may not act as client {requested!r}")
    return who.identity


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Checks each call's bearer token, its role for the method and, under mTLS, that the
    certificate's common name is the token's identity. Refusals say why.

    The tokens file is read again when its modification time or size changes, so revocations
    apply to the next call. A file that no longer parses refuses every call (fail closed) until
    it is fixed; the refusal names the file's problem."""

    def __init__(self, tokens_file: str, require_cert_identity: bool):
        self._path, self._require_cn = tokens_file, require_cert_identity
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: list[TokenEntry] = []
        self._problem = ""
        self._reload_if_changed()
        if self._problem:
            raise SecurityError(self._problem)

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self._path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as e:
            stamp, problem = None, f"tokens_file {self._path}: {e.strerror}"
        with self._lock:
            if stamp is not None and stamp == self._stamp:
                return
            if stamp is None:
                self._tokens, self._problem, self._stamp = [], problem, None
                return
            try:
                self._tokens, self._problem = load_tokens(self._path), ""
            except SecurityError as e:
                self._tokens, self._problem = [], str(e)
                log.error("refusing every call: %s", e)
            self._stamp = stamp

    def _lookup(self, token: str) -> TokenEntry | None:
        self._reload_if_changed()
        digest, found = token_digest(token), None
        for entry in self._tokens:  # constant time per entry, no early exit
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        token = _bearer(handler_call_details.invocation_metadata)
        entry = self._lookup(token) if token is not None else None
        if token is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing bearer token (authorization: Bearer ...)")
        if self._problem:
            return _refusal(handler, grpc.StatusCode.UNAVAILABLE, self._problem)
        if entry is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "unknown or revoked bearer token")
        if method not in ROLE_METHODS[entry.role]:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"role {entry.role!r} ({entry.identity}) may not call {method}")
        return _with_identity(handler, Caller(entry.identity, entry.role), self._require_cn)


def _wrap(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through `wrap(behaviour, streaming_response)`."""
    kinds = [("unary_unary", grpc.unary_unary_rpc_method_handler, False),
             ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
             ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
             ("stream_stream", grpc.stream_stream_rpc_method_handler, True)]
    for attr, make, streaming in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(wrap(behaviour, streaming),
                        request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise ValueError("handler without behaviour")


def _refusal(handler, code: grpc.StatusCode, reason: str) -> grpc.RpcMethodHandler:
    def wrap(_, streaming):
        def abort(request, context):
            context.abort(code, reason)
        return abort
    return _wrap(handler, wrap)


def _with_identity(handler, who: Caller, require_cn: bool) -> grpc.RpcMethodHandler:
    def check(context: grpc.ServicerContext) -> None:
        if not require_cn:
            return
        names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
        if who.identity not in names:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"token of {who.identity!r} presented with the certificate of {names}")

    def wrap(behaviour, streaming):
        # grpcio runs each call in a context of its own (and a streaming response's every
        # step on that call's thread), so the value set here is seen only by this call.
        if streaming:
            def run_stream(request, context):
                check(context)
                _CALLER.set(who)
                yield from behaviour(request, context)
            return run_stream

        def run(request, context):
            check(context)
            _CALLER.set(who)
            return behaviour(request, context)
        return run
    return _wrap(handler, wrap)


def server_interceptors(security: ServerSecurity) -> list[grpc.ServerInterceptor]:
    """The token check; TLS without tokens is refused (any caller could publish and pin)."""
    if not security.tokens_file:
        if security.tls:
            raise SecurityError("tokens_file: required with TLS; without tokens every caller "
                                "could publish and pin (pacflow policy gen-certs writes one)")
        return []
    if not security.tls:
        raise SecurityError("tokens_file: bearer tokens need TLS (gRPC sends call credentials "
                            "only over secure channels); set cert_file and key_file")
    return [TokenAuthInterceptor(security.tokens_file,
                                 require_cert_identity=bool(security.client_ca_file))]
