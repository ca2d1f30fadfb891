"""
The PKI tool: a certificate authority, server and client certificates for
mutual TLS, and the C{jobworker-pki} command that makes them.

Identity comes from the client certificate alone (see C{DESIGN.md}): the
subject's CN names who the client is and its OU names the role (C{admin},
C{user}, C{viewer}).  This module only writes such certificates; checking
them is L{jobworker.tls}'s job.

Every key made here is ECDSA on P-256 and every signature SHA-256.  Each
C{make_*} function writes a PEM certificate C{<name>.pem} and its
unencrypted private key C{<name>.key}; key files are created with mode 0600
and any existing file of the same name is replaced.  Certificates made
elsewhere (for instance by an organisation's own RSA CA, with the C{openssl}
command) work with the service just as well: L{read_credentials} (from
L{jobworker.credentials}, which L{jobworker.tls} uses as well; re-exported
here) takes any key type, and raises L{CredentialError} naming the file
when one cannot be used.

Command line::

    jobworker-pki dev [DIR]                       CA, server and 4 clients (DIR: certs)
    jobworker-pki ca DIR [--ca-name NAME]         DIR/ca.pem, DIR/ca.key
    jobworker-pki server DIR --hostname H ...     DIR/server.pem, signed by DIR/ca.*
    jobworker-pki client DIR --cn NAME --role R   DIR/NAME.pem, signed by DIR/ca.*
    jobworker-pki sign DIR CSR --role R           a certificate for a CSR made elsewhere
    jobworker-pki sign DIR CSR --hostname H ...   (the same, for a server)

Every subcommand takes C{--days N}.  Every subcommand but C{dev} refuses to
replace existing files unless given C{--force}; C{dev} does nothing when
C{DIR/ca.pem} exists.  An error is one line on standard error and exit
status 1.

Roles and OUs: a client certificate's subject carries exactly one OU, its
role: C{admin}, C{user} or C{viewer} (the tool refuses any other).  A
certificate whose subject has no OU, an unknown one, or B{two or more} OUs
(even if one of them is C{admin}) is accepted for TLS but grants no role:
the server denies it every operation, rather than guess which OU was meant.
The same holds for the CN: exactly one, or the certificate names nobody.

C{sign} keeps private keys where they were made: the requester runs, say,
C{openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes
-keyout me.key -out me.csr -subj /CN=alice}, sends only C{me.csr}, and gets
back a certificate whose subject the CA chose: the CSR's CN (or C{--cn})
and the role given with C{--role}; any OU or extension the CSR asks for is
ignored.

Under C{sudo}, files are given to the invoking user (C{SUDO_UID} and
C{SUDO_GID}), so C{sudo jobworker-pki dev certs} leaves keys that user can
read, still mode 0600.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import __version__
from jobworker.credentials import CredentialError, read_certificates, read_credentials

__all__ = [
    "ROLES",
    "CredentialError",
    "read_certificates",
    "read_credentials",
    "make_ca",
    "make_server_cert",
    "make_client_cert",
    "make_dev_pki",
    "sign_csr",
    "main",
]

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
    return _write_pair(directory, "ca", builder.sign(key, hashes.SHA256()), key)


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
    _check_file_stem(stem)
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
    _give_to_invoking_user(cert_path)
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


def _give_to_invoking_user(path: Path) -> None:
    """
    Under sudo (root, with C{SUDO_UID} set), hand C{path} to the user who
    ran sudo: a development PKI made with C{sudo} must stay readable by
    the developer's own shell.  Elsewhere files keep the creator's owner.
    """
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() != 0 or not uid or not uid.isdigit():
        return
    os.chown(path, int(uid), int(gid) if gid and gid.isdigit() else -1)


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
    _check_file_stem(name)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _build_leaf(
        ca_cert_path, ca_key_path, key.public_key(), subject, not_valid_before, not_valid_after, extensions
    )
    return _write_pair(directory, name, certificate, key)


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


def _check_file_stem(name: str) -> None:
    if not name or name in (".", "..") or Path(name).name != name:
        raise ValueError(f"{name!r} cannot be used as a file name")


def _write_pair(
    directory: Path,
    name: str,
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> tuple[Path, Path]:
    """
    Write C{<name>.pem} and C{<name>.key} into C{directory}, the key readable
    by its owner only.
    """
    directory = Path(directory)
    if not directory.exists():
        directory.mkdir(parents=True)
        _give_to_invoking_user(directory)
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(descriptor, "wb") as key_file:
        # The mode given to os.open only applies when the file is created; an
        # existing key file may have been readable by others.
        os.fchmod(key_file.fileno(), 0o600)
        key_file.write(key_pem)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    for path in (key_path, cert_path):
        _give_to_invoking_user(path)
    return cert_path, key_path


class _ArgumentParser(argparse.ArgumentParser):
    """
    An argument parser whose usage errors, like every other error of the
    tool, are one line on standard error and exit status 1.
    """

    def error(self, message: str) -> None:  # type: ignore[override]  # exits, as argparse's does
        self.exit(1, f"{self.prog}: error: {message}\n")


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    # At most 100 years: beyond that datetime arithmetic, and any sane
    # rotation policy, break down.
    if not 1 <= days <= 36500:
        raise argparse.ArgumentTypeError(f"{days} is not 1 to 36500 days")
    return days


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="jobworker-pki",
        description="Make a CA, server and client certificates for jobworker.",
        epilog="A client certificate carries one OU, its role; a certificate with no OU, "
        "an unknown one or two OUs gets no role and is denied every operation.",
    )
    parser.add_argument("--version", action="version", version=f"jobworker-pki {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def days(sub: argparse.ArgumentParser, default: str) -> None:
        sub.add_argument("--days", type=_days, default=None, help=f"validity in days (default {default})")

    dev = commands.add_parser(
        "dev", help="make a CA, a localhost server and clients admin, alice, bob, viewer"
    )
    dev.add_argument("directory", nargs="?", default="certs", type=Path)
    dev.add_argument("--force", action="store_true", help="replace an existing PKI")
    dev.add_argument("--ca-name", default="jobworker dev CA", help="the CA's common name (default: jobworker dev CA)")
    days(dev, "3650 for the CA, 825 for the others")

    ca = commands.add_parser("ca", help="make DIR/ca.pem and DIR/ca.key")
    ca.add_argument("directory", type=Path)
    ca.add_argument("--ca-name", default="jobworker CA", help="the CA's common name (default: jobworker CA)")
    ca.add_argument("--force", action="store_true", help="replace existing files")
    days(ca, "3650")

    server = commands.add_parser(
        "server", help="make DIR/server.pem and .key, signed by DIR/ca.pem"
    )
    server.add_argument("directory", type=Path)
    server.add_argument(
        "--hostname",
        action="append",
        required=True,
        help="a DNS name or IP address clients dial (repeatable; the first is the CN)",
    )
    server.add_argument("--name", default="server", help="file name stem (default: server)")
    server.add_argument("--force", action="store_true", help="replace existing files")
    days(server, "825")

    client = commands.add_parser(
        "client", help="make DIR/CN.pem and .key, signed by DIR/ca.pem"
    )
    client.add_argument("directory", type=Path)
    client.add_argument("--cn", required=True, help="the client's identity")
    client.add_argument("--role", required=True, choices=ROLES, help="admin, user or viewer")
    client.add_argument("--force", action="store_true", help="replace existing files")
    days(client, "825")

    sign = commands.add_parser(
        "sign", help="sign a CSR made elsewhere (the key stays there): DIR/CN.pem, signed by DIR/ca.pem"
    )
    sign.add_argument("directory", type=Path)
    sign.add_argument("csr", type=Path, help="the PEM certificate signing request")
    kind = sign.add_mutually_exclusive_group(required=True)
    kind.add_argument("--role", choices=ROLES, help="a client certificate with this role")
    kind.add_argument("--hostname", action="append", help="a server certificate for this name (repeatable)")
    sign.add_argument("--cn", help="the subject's CN (default: the CSR's)")
    sign.add_argument("--name", help="file name stem (default: the CN)")
    sign.add_argument("--force", action="store_true", help="replace an existing certificate")
    days(sign, "825")
    return parser


def _refuse_to_replace(directory: Path, name: str, force: bool) -> None:
    if force:
        return
    for path in (directory / f"{name}.pem", directory / f"{name}.key"):
        if path.exists():
            raise ValueError(f"{path} exists (use --force to replace it)")


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run C{jobworker-pki}.

    @param argv: the arguments after the program name; C{sys.argv[1:]} by
        default.
    @return: the exit status: 0, or 1 after an error printed as one line on
        standard error.
    """
    arguments = _parser().parse_args(argv)
    directory: Path = arguments.directory
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    try:
        if arguments.command == "dev":
            existed = (directory / "ca.pem").exists()
            make_dev_pki(directory, force=arguments.force, ca_name=arguments.ca_name, days=arguments.days)
            if existed and not arguments.force:
                print(f"{directory / 'ca.pem'} exists; left {directory} as it is")
            else:
                print(f"wrote a development PKI to {directory}")
        elif arguments.command == "ca":
            _refuse_to_replace(directory, "ca", arguments.force)
            print(*make_ca(directory, name=arguments.ca_name, days=arguments.days or 3650))
        elif arguments.command == "server":
            _refuse_to_replace(directory, arguments.name, arguments.force)
            print(
                *make_server_cert(
                    directory, ca_cert_path, ca_key_path, name=arguments.name,
                    hostnames=arguments.hostname, days=arguments.days or 825,
                )
            )
        elif arguments.command == "client":
            _refuse_to_replace(directory, arguments.cn, arguments.force)
            print(
                *make_client_cert(
                    directory, ca_cert_path, ca_key_path, arguments.cn, arguments.role,
                    days=arguments.days or 825,
                )
            )
        else:
            print(
                sign_csr(
                    directory, ca_cert_path, ca_key_path, arguments.csr, role=arguments.role,
                    hostnames=arguments.hostname or (), common_name=arguments.cn, name=arguments.name,
                    days=arguments.days or 825, replace=arguments.force,
                )
            )
    except (OSError, ValueError) as e:
        print(f"jobworker-pki: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
