"""
Making certificates: a CA, server and client certificates, the
development PKI and certificates for a CSR made elsewhere (ECDSA P-256,
SHA-256; subjects as L{jobworker.pki} describes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.credentials import read_credentials
from jobworker.pki.files import check_file_stem, give_to_invoking_user, write_pair

__all__ = ["ROLES", "make_ca", "make_server_cert", "make_client_cert", "make_dev_pki", "sign_csr"]

# The spellings accepted by make_client_cert(extended_key_usage=...), named
# as in RFC 5280 and in openssl's extendedKeyUsage configuration.
_EXTENDED_KEY_USAGES = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
}

# The roles the service knows (see jobworker.policy.Role); the tool refuses
# to write any other into a certificate.
ROLES = ("admin", "user", "viewer")

# Certificates start this far in the past so that a peer whose clock is a
# little behind ours accepts a certificate made a moment ago.
_CLOCK_SKEW = timedelta(minutes=5)

# What make_dev_pki makes: the server's names, and each client's CN and role.
_DEV_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
_DEV_CLIENTS = (
    ("admin", "admin"),
    ("alice", "user"),
    ("bob", "user"),
    ("viewer", "viewer"),
)


def make_ca(
    directory: Path, name: str = "jobworker dev CA", days: int = 3650
) -> tuple[Path, Path]:
    """
    Make a self-signed certificate authority.

    The CA may sign leaf certificates only (path length 0), which is all the
    service needs and stops a stolen CA key from minting intermediate CAs.

    @param directory: where to write C{ca.pem} and C{ca.key}; created if
        missing.
    @param name: the CA's common name.
    @param days: validity in days from now.
    @return: the paths of the certificate and of the key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.now(UTC) - _CLOCK_SKEW
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
    )
    return write_pair(directory, "ca", builder.sign(key, hashes.SHA256()), key)


def make_server_cert(
    directory: Path,
    ca_cert_path: Path,
    ca_key_path: Path,
    name: str = "server",
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 825,
) -> tuple[Path, Path]:
    """
    Make a server certificate signed by the CA at C{ca_cert_path}.

    Clients check the name they dialled against the subject alternative
    names, so every name or address clients use must be in C{hostnames}.

    @param hostnames: DNS names and IPv4/IPv6 addresses; at least one.  The
        first is also the subject's CN, for people reading the certificate.
    @param days: validity in days from now (825 is the longest that Apple
        platforms accept for a server certificate).
    @return: the paths of C{<name>.pem} and C{<name>.key}.
    @raise ValueError: no hostname, or a name that is not a valid file name.
    @raise CredentialError: the CA's files cannot be read or do not match.
    """
    if not hostnames:
        raise ValueError("a server certificate needs at least one hostname")
    start = datetime.now(UTC) - _CLOCK_SKEW
    return _issue(
        directory,
        ca_cert_path,
        ca_key_path,
        name,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]),
        start,
        start + timedelta(days=days),
        [
            _alternative_names(hostnames),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        ],
    )


def make_client_cert(
    directory: Path,
    ca_cert_path: Path,
    ca_key_path: Path,
    common_name: str,
    role: str | None,
    name: str | None = None,
    days: int = 825,
    not_valid_before: datetime | None = None,
    not_valid_after: datetime | None = None,
    extended_key_usage: Sequence[str] = ("clientAuth",),
) -> tuple[Path, Path]:
    """
    Make a client certificate signed by the CA at C{ca_cert_path}.

    @param common_name: who the client is (the subject's CN).
    @param role: the client's role (the subject's OU), or L{None} for a
        certificate without an OU, which the service grants no role.
    @param name: the file name stem; C{common_name} by default.  It must be
        a plain file name, so a CN cannot steer the files out of
        C{directory}.
    @param days: validity in days from C{not_valid_before}; ignored when
        C{not_valid_after} is given.
    @param not_valid_before: start of validity (timezone-aware); a few
        minutes ago by default.
    @param not_valid_after: end of validity (timezone-aware), for making
        certificates that have already expired.
    @param extended_key_usage: C{"clientAuth"} and/or C{"serverAuth"}; an
        empty sequence leaves the extension out.  The service accepts only
        certificates with C{"clientAuth"}; the others exist for tests.
    @return: the paths of C{<name>.pem} and C{<name>.key}.
    @raise ValueError: an unknown extended key usage, or a name that is not
        a valid file name.
    @raise CredentialError: the CA's files cannot be read or do not match.
    """
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if role is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    extensions: list[x509.ExtensionType] = []
    if extended_key_usage:
        extensions.append(
            x509.ExtendedKeyUsage(
                [_extended_key_usage_oid(usage) for usage in extended_key_usage]
            )
        )
    if not_valid_before is None:
        not_valid_before = datetime.now(UTC) - _CLOCK_SKEW
    if not_valid_after is None:
        not_valid_after = not_valid_before + timedelta(days=days)
    return _issue(
        directory,
        ca_cert_path,
        ca_key_path,
        common_name if name is None else name,
        x509.Name(attributes),
        not_valid_before,
        not_valid_after,
        extensions,
    )


def make_dev_pki(
    directory: Path, *, force: bool = False, ca_name: str = "jobworker dev CA", days: int | None = None
) -> None:
    """
    Make everything a developer needs to run and try the service locally.

    Writes C{ca.pem}/C{ca.key}; C{server.pem}/C{server.key} for
    C{localhost}, C{127.0.0.1} and C{::1}; and client certificates
    C{admin} (role admin), C{alice} and C{bob} (role user) and C{viewer}
    (role viewer), each as C{<cn>.pem}/C{<cn>.key}.  Nothing else is
    written.

    @param force: replace an existing PKI.  Without it, a C{directory} that
        already holds C{ca.pem} is left exactly as it is, so a set-up script
        may call this every time.
    @param ca_name: the CA's common name.
    @param days: validity of every certificate; by default 3650 days for
        the CA and 825 for the others.
    """
    directory = Path(directory)
    if (directory / "ca.pem").exists() and not force:
        return
    ca_cert_path, ca_key_path = make_ca(directory, name=ca_name, days=days or 3650)
    make_server_cert(directory, ca_cert_path, ca_key_path, hostnames=_DEV_HOSTNAMES, days=days or 825)
    for common_name, role in _DEV_CLIENTS:
        make_client_cert(directory, ca_cert_path, ca_key_path, common_name, role, days=days or 825)


def sign_csr(
    directory: Path,
    ca_cert_path: Path,
    ca_key_path: Path,
    csr_path: Path,
    *,
    role: str | None = None,
    hostnames: Sequence[str] = (),
    common_name: str | None = None,
    name: str | None = None,
    days: int = 825,
    replace: bool = True,
) -> Path:
    """
    Sign a certificate signing request made elsewhere (for instance with
    C{openssl req}), so that its private key never leaves where it was
    made.  The CA decides the subject: the CSR's CN (or C{common_name}) and,
    for a client, C{role} as the only OU; for a server (C{hostnames}), the
    names it may be dialled by.  Nothing else the CSR asks for is copied.

    @param role: a client certificate with this role (one of L{ROLES}).
    @param hostnames: a server certificate for these DNS names and
        addresses instead; exactly one of C{role} and C{hostnames}.
    @param name: the file name stem; the CN by default.
    @param replace: replace an existing C{<name>.pem}; without it, that is
        a C{ValueError}.
    @return: the path of C{<name>.pem} in C{directory}.
    @raise ValueError: the CSR cannot be read, its signature is wrong, it
        has no CN and none is given, or the role is unknown.
    @raise CredentialError: the CA's files cannot be read or do not match.
    """
    if (role is None) == (not hostnames):
        raise ValueError("sign needs either --role (a client) or --hostname (a server)")
    if role is not None and role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    csr_path = Path(csr_path)
    try:
        request = x509.load_pem_x509_csr(csr_path.read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read {csr_path}: {e.strerror}") from None
    except ValueError:
        raise ValueError(f"{csr_path} holds no PEM certificate signing request") from None
    if not request.is_signature_valid:
        raise ValueError(f"{csr_path}: the request's signature does not match its key")
    if common_name is None:
        names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or not names[0].value:
            raise ValueError(f"{csr_path} has no single CN; give one with --cn")
        common_name = str(names[0].value)
    if hostnames:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        extensions: list[x509.ExtensionType] = [
            _alternative_names(hostnames),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        ]
    else:
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role or ""),
        ])
        extensions = [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])]
    stem = common_name if name is None else name
    check_file_stem(stem)
    start = datetime.now(UTC) - _CLOCK_SKEW
    certificate = _build_leaf(
        ca_cert_path, ca_key_path, request.public_key(), subject, start, start + timedelta(days=days), extensions
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.pem"
    if not replace and cert_path.exists():
        raise ValueError(f"{cert_path} exists (use --force to replace it)")
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    give_to_invoking_user(cert_path)
    return cert_path


def _alternative_names(hostnames: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for hostname in hostnames:
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            names.append(x509.DNSName(hostname))
        else:
            names.append(x509.IPAddress(address))
    return x509.SubjectAlternativeName(names)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _extended_key_usage_oid(usage: str) -> x509.ObjectIdentifier:
    try:
        return _EXTENDED_KEY_USAGES[usage]
    except KeyError:
        known = ", ".join(sorted(_EXTENDED_KEY_USAGES))
        raise ValueError(
            f"unknown extended key usage {usage!r} (known: {known})"
        ) from None


def _issue(
    directory: Path,
    ca_cert_path: Path,
    ca_key_path: Path,
    name: str,
    subject: x509.Name,
    not_valid_before: datetime,
    not_valid_after: datetime,
    extensions: Iterable[x509.ExtensionType],
) -> tuple[Path, Path]:
    """
    Make a new key and a leaf certificate for it signed by the CA, with the
    extensions every leaf gets plus C{extensions}, and write both.
    """
    check_file_stem(name)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _build_leaf(
        ca_cert_path, ca_key_path, key.public_key(), subject, not_valid_before, not_valid_after, extensions
    )
    return write_pair(directory, name, certificate, key)


def _build_leaf(
    ca_cert_path: Path,
    ca_key_path: Path,
    public_key: Any,
    subject: x509.Name,
    not_valid_before: datetime,
    not_valid_after: datetime,
    extensions: Iterable[x509.ExtensionType],
) -> x509.Certificate:
    """
    A leaf certificate for C{public_key}, signed by the CA, with the
    extensions every leaf gets plus C{extensions}.
    """
    (ca_cert, *_), ca_key = read_credentials(ca_cert_path, ca_key_path)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_valid_before)
        .not_valid_after(not_valid_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256())
