"""
Reading and writing certificate files: L{read_certificates} and
L{read_credentials} (any key type, as L{jobworker.tls} needs), and
L{write_pair}, which writes a certificate and its key (mode 0600, given
to the invoking user under C{sudo}).  See L{jobworker.pki}.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)

__all__ = ["StrPath", "CredentialError", "read_certificates", "read_credentials", "write_pair", "give_to_invoking_user", "check_file_stem"]

# A file name as the caller has it.
StrPath = str | os.PathLike[str]


class CredentialError(ValueError):
    """
    A certificate or key file cannot be read, or does not hold what it
    should; the message names the file.
    """


def read_certificates(path: StrPath) -> list[x509.Certificate]:
    """
    Read every certificate in a PEM file, in file order: a CA bundle, or a
    certificate followed by the intermediates that chain it to its CA.

    @raise CredentialError: the file cannot be read or holds no PEM
        certificate.
    """
    path = Path(path)
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise CredentialError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise CredentialError(f"{path} holds no PEM certificate") from None


def read_credentials(
    cert_path: StrPath, key_path: StrPath
) -> tuple[list[x509.Certificate], CertificateIssuerPrivateKeyTypes]:
    """
    Read a certificate (with any intermediates after it) and its private key,
    as made by this module or by any other tool (an RSA key from C{openssl}
    does as well as our ECDSA ones).

    @return: the certificates, the one the key belongs to first, and the key.
    @raise CredentialError: a file cannot be read or is not PEM of the right
        kind, the key is encrypted or cannot sign, or the key does not belong
        to the first certificate.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    chain = read_certificates(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise CredentialError(f"cannot read {key_path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        # cryptography raises TypeError for an encrypted key read without a
        # password; the service has no way to ask for one.
        raise CredentialError(
            f"{key_path} holds no unencrypted PEM private key ({e})"
        ) from None
    # A Union works with isinstance at run time (3.10+); mypy takes only
    # classes, hence the ignore and the cast below.
    if not isinstance(key, CertificateIssuerPrivateKeyTypes):  # type: ignore[arg-type]
        raise CredentialError(f"{key_path}: a {type(key).__name__} cannot sign")
    if key.public_key() != chain[0].public_key():
        raise CredentialError(f"{key_path} is not the private key of {cert_path}")
    return chain, cast(CertificateIssuerPrivateKeyTypes, key)


def give_to_invoking_user(path: Path) -> None:
    """
    Under sudo (root, with C{SUDO_UID} set), hand C{path} to the user who
    ran sudo: a development PKI made with C{sudo} must stay readable by
    the developer's own shell.  Elsewhere files keep the creator's owner.
    """
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() != 0 or not uid or not uid.isdigit():
        return
    os.chown(path, int(uid), int(gid) if gid and gid.isdigit() else -1)


def check_file_stem(name: str) -> None:
    if not name or name in (".", "..") or Path(name).name != name:
        raise ValueError(f"{name!r} cannot be used as a file name")


def write_pair(
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
        give_to_invoking_user(directory)
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
        give_to_invoking_user(path)
    return cert_path, key_path
