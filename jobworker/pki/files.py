"""
Writing what L{jobworker.pki} makes: L{write_pair} writes a certificate
and its key (the key mode 0600; both given to the invoking user under
C{sudo}).  Reading credentials is L{jobworker.credentials}'s job.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["write_pair", "give_to_invoking_user", "check_file_stem"]


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
