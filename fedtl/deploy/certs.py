"""Certificates and keys for a secure deployment, made with the ``cryptography`` package.

``make_certs(out_dir, hosts, supernodes)`` writes:

- ``ca.pem`` / ``ca.key``: a private certificate authority (keep ``ca.key`` offline; every
  machine gets ``ca.pem`` to check the SuperLink's certificate);
- ``superlink.pem`` / ``superlink.key``: the SuperLink's TLS certificate, signed by the CA, valid
  for the host names and IP addresses it is reached at (``flower-superlink --ssl-certfile
  superlink.pem --ssl-keyfile superlink.key --ssl-ca-certfile ca.pem``);
- ``supernodes/<name>.key`` / ``<name>.pub``: one ECDSA P-384 key pair per SuperNode in
  OpenSSH format, as Flower 1.42's node authentication expects (``flwr supernode register
  <name>.pub``; ``flower-supernode --auth-supernode-private-key <name>.key``).

Private keys are written with mode 0600; existing files are never overwritten silently.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names the SuperLink is always reachable at from its own machine: Flower's SuperExec connects
# to the SuperLink's Runtime API on 127.0.0.1 even when the SuperLink listens on 0.0.0.0.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Certs:
    """Paths of everything ``make_certs`` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    supernode_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)
    hosts: tuple[str, ...]


def default_hosts() -> list[str]:
    """This machine's host name and fully qualified name (what SuperNodes on a LAN use)."""
    names = []
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names and name not in LOCAL_NAMES:
            names.append(name)
    return names


def _subject_alt_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _check_host(host: str) -> str:
    host = host.strip()
    if not host or any(c in host for c in " /:") and not _is_ip(host):
        raise ValueError(f"'{host}' is not a host name or an IP address (no port, no URL)")
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out_dir: str | Path, hosts: Sequence[str] = (), supernodes: int | Sequence[str] = 2,
               *, days: int = 365, force: bool = False) -> Certs:
    """Create a CA, the SuperLink's certificate for ``hosts`` and SuperNode key pairs.

    ``hosts``: host names / IP addresses the SuperNodes and ``flwr`` use to reach the
    SuperLink (``localhost``, ``127.0.0.1`` and ``::1`` are always added). ``supernodes``: a
    count (named ``supernode-1`` ...) or a list of names. ``days``: validity of the
    certificates. Raises FileExistsError rather than overwrite, unless ``force``.
    """
    out = Path(out_dir).expanduser()
    names = ([f"supernode-{i}" for i in range(1, supernodes + 1)]
             if isinstance(supernodes, int) else list(supernodes))
    if isinstance(supernodes, int) and supernodes < 0:
        raise ValueError(f"supernodes = {supernodes}: must be >= 0")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"SuperNode name '{name}' cannot be a file name")
    if len(set(names)) != len(names):
        raise ValueError("SuperNode names must be distinct")
    if days < 1:
        raise ValueError(f"days = {days}: must be >= 1")
    all_hosts: list[str] = []
    for host in [*LOCAL_NAMES, *hosts]:
        host = _check_host(host)
        if host not in all_hosts:
            all_hosts.append(host)

    paths = Certs(out, out / "ca.pem", out / "ca.key", out / "superlink.pem",
                  out / "superlink.key",
                  {n: (out / "supernodes" / f"{n}.key", out / "supernodes" / f"{n}.pub")
                   for n in names}, tuple(all_hosts))
    planned = [paths.ca_cert, paths.ca_key, paths.superlink_cert, paths.superlink_key,
               *(p for pair in paths.supernode_keys.values() for p in pair)]
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{existing[0]} already exists; choose another folder or pass --force to replace "
            f"the {len(existing)} existing file(s)"
        )
    (out / "supernodes").mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    not_before = now - dt.timedelta(minutes=5)  # tolerate small clock differences
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtl deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[-1])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(_subject_alt_names(all_hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.superlink_key, _key_pem(server_key), private=True)
    _write(paths.superlink_cert, server_cert.public_bytes(serialization.Encoding.PEM),
           private=False)
    for name, (private_path, public_path) in paths.supernode_keys.items():
        node_key = ec.generate_private_key(ec.SECP384R1())
        _write(private_path, node_key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()), private=True)
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)
        _write(public_path, public + f" {name}\n".encode(), private=False)
    return paths
