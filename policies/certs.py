"""`pacflow policy gen-certs DIR`: a development CA, a server certificate, and one certificate
plus bearer token per client identity, in the layout `ServerSecurity.from_dir` and
`ClientSecurity.from_dir` read:

    DIR/ca.pem ca.key server.pem server.key tokens.yaml
    DIR/clients/<identity>.pem .key .token      (learner, actor, operator, robot-1, ...)

For development and tests; production fleets use their own PKI and the same file names.
Private keys and tokens are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from policies.security import ROLES, token_digest


def role_of(identity: str) -> str:
    """learner, actor and operator are their own roles; every other identity is a robot."""
    return identity if identity in ROLES else "robot"


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(name: str, key, issuer_name: x509.Name, issuer_key, days: int,
                 ca: bool = False, sans: list[x509.GeneralName] | None = None,
                 usage: list | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def generate_dev_credentials(directory: str | Path, clients: list[str],
                             hosts: list[str] = (), days: int = 30) -> dict[str, str]:
    """Writes the CA, the server certificate (valid for localhost, loopback and `hosts`) and
    each client's certificate and token; returns {identity: role}."""
    d = Path(directory)
    (d / "clients").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacflow development CA")])
    ca_cert = _certificate("pacflow development CA", ca_key, ca_name, ca_key, days, ca=True)
    _write(d / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(d / "ca.key", _key_pem(ca_key), secret=True)

    server_key = ec.generate_private_key(ec.SECP256R1())
    names = ["localhost", "127.0.0.1", "::1", *hosts]
    server_cert = _certificate("pacflow policy server", server_key, ca_name, ca_key, days,
                               sans=[_san(h) for h in dict.fromkeys(names)],
                               usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    _write(d / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(d / "server.key", _key_pem(server_key), secret=True)

    entries, roles = [], {}
    for identity in dict.fromkeys(clients):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(identity, key, ca_name, ca_key, days,
                            usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
        token = secrets.token_urlsafe(32)
        _write(d / "clients" / f"{identity}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(d / "clients" / f"{identity}.key", _key_pem(key), secret=True)
        _write(d / "clients" / f"{identity}.token", token.encode(), secret=True)
        roles[identity] = role_of(identity)
        entries.append({"sha256": token_digest(token), "role": roles[identity],
                        "identity": identity})
    _write(d / "tokens.yaml", yaml.safe_dump({"tokens": entries}, sort_keys=False).encode())
    return roles
