"""
Reading certificates and private keys from PEM files: what the PKI tool
(L{jobworker.pki}) and the TLS set-up of the server and the Twisted client
(L{jobworker.tls}) both need, below both of them.

Only C{cryptography}; no pyOpenSSL, no Twisted.  Every problem is one
L{CredentialError} whose message names the file, so that the service's
start-up and C{jobworker-pki} can print it as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)

__all__ = ["CredentialError", "StrPath", "read_certificates", "read_credentials"]

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
