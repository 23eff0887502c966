"""Who may call the policy service: TLS / mutual TLS from certificate files, bearer tokens with
roles, and the rule that plaintext is only for loopback and only when explicitly allowed.

Roles (a token has exactly one):
    learner   Publish
    actor     Subscribe, Fetch, UploadEpisode, Act   (sim actors inside the cluster)
    robot     Subscribe, Fetch, UploadEpisode, Act   (robot clients outside it)
    operator  Pin, Unpin, Fetch
List is read-only and open to every role. A token also names an identity (e.g. "robot-7"); with
client certificates the certificate's common name must be that identity, so a stolen token is
useless without the robot's key, and a robot uploads episodes only under its own id.

The tokens file stores sha256 digests, never the tokens themselves (reliability.md §3.1):
    tokens:
      - {sha256: <hex digest of the token>, role: robot, identity: robot-7}
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import ipaddress
from pathlib import Path
from typing import Callable

import grpc
import yaml

ROLES = ("learner", "actor", "robot", "operator")
ROLE_METHODS = {
    "learner": frozenset({"Publish", "List"}),
    "actor": frozenset({"Subscribe", "Fetch", "UploadEpisode", "Act", "List"}),
    "robot": frozenset({"Subscribe", "Fetch", "UploadEpisode", "Act", "List"}),
    "operator": frozenset({"Pin", "Unpin", "Fetch", "List"}),
}
# The caller's identity while a handler runs ("" when tokens are off); see `caller_identity`.
_IDENTITY: contextvars.ContextVar[str] = contextvars.ContextVar("pacflow_identity", default="")


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


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    digest: str  # sha256 hex of the token
    role: str  # one of ROLES
    identity: str  # e.g. "robot-7"; must equal the client certificate's CN under mTLS


def load_tokens(path: str) -> list[TokenEntry]:
    """Parses a tokens file; every problem names the entry."""
    try:
        data = yaml.safe_load(_read(path, "tokens_file")) or {}
    except yaml.YAMLError as e:
        raise SecurityError(f"tokens_file {path}: not valid YAML ({e})") from None
    entries = []
    for i, item in enumerate(data.get("tokens", []) if isinstance(data, dict) else []):
        if not isinstance(item, dict) or not {"sha256", "role", "identity"} <= set(item):
            raise SecurityError(f"tokens_file {path}: tokens[{i}] needs sha256, role, identity")
        if item["role"] not in ROLES:
            raise SecurityError(f"tokens_file {path}: tokens[{i}].role {item['role']!r} is not "
                                f"one of {', '.join(ROLES)}")
        entries.append(TokenEntry(str(item["sha256"]), item["role"], str(item["identity"])))
    if not entries:
        raise SecurityError(f"tokens_file {path}: no tokens")
    return entries


def caller_identity() -> str:
    """The authenticated identity of the current call ("" when tokens are off)."""
    return _IDENTITY.get()


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Checks each call's bearer token, its role for the method and, under mTLS, that the
    certificate's common name is the token's identity. Refusals say why."""

    def __init__(self, tokens: list[TokenEntry], require_cert_identity: bool):
        self._tokens, self._require_cn = tokens, require_cert_identity

    def _lookup(self, token: str) -> TokenEntry | None:
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
        if entry is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        if method not in ROLE_METHODS[entry.role]:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"role {entry.role!r} ({entry.identity}) may not call {method}")
        return _with_identity(handler, entry.identity, self._require_cn)


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


def _with_identity(handler, identity: str, require_cn: bool) -> grpc.RpcMethodHandler:
    def check(context: grpc.ServicerContext) -> None:
        if not require_cn:
            return
        names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
        if identity not in names:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"token of {identity!r} presented with the certificate of {names}")

    def wrap(behaviour, streaming):
        # grpcio runs each call in a context of its own (and a streaming response's every
        # step on that call's thread), so the value set here is seen only by this call.
        if streaming:
            def run_stream(request, context):
                check(context)
                _IDENTITY.set(identity)
                yield from behaviour(request, context)
            return run_stream

        def run(request, context):
            check(context)
            _IDENTITY.set(identity)
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
    return [TokenAuthInterceptor(load_tokens(security.tokens_file),
                                 require_cert_identity=bool(security.client_ca_file))]
