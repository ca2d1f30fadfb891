"""
The blocking client's TLS, made with the standard library alone: its
context (L{client_ssl_context}) and what a failed handshake means to a
user (L{tls_failure_cause}).

C{jobcli} must start fast, so this module imports nothing outside the
standard library (no Twisted, pyOpenSSL or cryptography).  Its policy is the
one L{jobworker.tls} applies on the Twisted side: TLS 1.3 only, the server's
certificate verified against the given CA file alone (never the system's
roots) and against the host name or address dialled, and the client's own
certificate presented.
"""

from __future__ import annotations

import ssl
from os import PathLike

__all__ = ["ClientTLSError", "client_ssl_context", "tls_failure_cause"]

StrPath = str | PathLike[str]


class ClientTLSError(Exception):
    """
    A CA, certificate or key file cannot be read or used; the message names
    the file.
    """


def client_ssl_context(
    ca_path: StrPath, cert_path: StrPath, key_path: StrPath
) -> ssl.SSLContext:
    """
    Make the context for C{context.wrap_socket(sock, server_hostname=host)}
    or C{context.wrap_bio(incoming, outgoing, server_hostname=host)} (as
    C{jobcli} does), where C{host} is the DNS name or IP address the server's
    certificate must carry.

    @param ca_path: PEM file of the CA certificates the server's certificate
        must chain to.
    @param cert_path: PEM file of the client's certificate, followed by any
        intermediates.
    @param key_path: PEM file of the client's unencrypted private key.
    @raise ClientTLSError: a file cannot be read or does not hold what it
        should, or the key does not belong to the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_TICKET
    ca_text = _read_pem(ca_path, "CERTIFICATE")
    try:
        context.load_verify_locations(cadata=ca_text)
    except ssl.SSLError as e:
        raise ClientTLSError(f"{ca_path} holds no usable CA certificate: {e}") from None
    # load_cert_chain reads the files itself and reports a missing one
    # without its name, so check first that each can be read.
    _read_pem(cert_path, "CERTIFICATE")
    _read_pem(key_path, "PRIVATE KEY")

    def refuse_encrypted_key() -> str:
        # Without this OpenSSL would prompt on the terminal for a passphrase.
        raise ClientTLSError(f"{key_path} is encrypted; use an unencrypted key")

    try:
        context.load_cert_chain(cert_path, key_path, password=refuse_encrypted_key)
    except ssl.SSLError as e:
        raise ClientTLSError(
            f"cannot use certificate {cert_path} with key {key_path}: {e}"
        ) from None
    return context


def _read_pem(path: StrPath, label: str) -> str:
    """
    Read a PEM file that should hold a block such as C{-----BEGIN
    CERTIFICATE-----} (C{label} C{"CERTIFICATE"}) or C{-----BEGIN EC PRIVATE
    KEY-----} (C{label} C{"PRIVATE KEY"}).
    """
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except OSError as e:
        raise ClientTLSError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        text = ""
    if f"{label}-----" not in text:
        raise ClientTLSError(f"{path} holds no PEM {label.lower()}")
    return text


def tls_failure_cause(exc: ssl.SSLError, host: str) -> str:
    """
    What an C{ssl} error of the handshake or of the first read means to a
    user: which side refused which certificate, and why.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or "").lower()
        if "hostname mismatch" in detail or "ip address mismatch" in detail:
            return f"server name mismatch: the server's certificate is not for {host!r} (dial a name the certificate carries)"
        if "expired" in detail:
            return "the server's certificate has expired"
        if "not yet valid" in detail:
            return "the server's certificate is not valid yet (check the clocks)"
        if "issuer" in detail or "self-signed" in detail or "self signed" in detail:
            return "unknown CA: the server's certificate is not signed by the CA given (--ca)"
        return f"the server's certificate was refused: {exc.verify_message or exc.reason}"
    reason = (exc.reason or "").upper()
    if "ALERT" in reason:
        # TLS 1.3: the server checks our certificate after the handshake
        # has ended on our side, so its verdict is an alert on a later read.
        if "UNKNOWN_CA" in reason:
            return "the server refused our client certificate: it is not signed by a CA the server trusts (unknown CA)"
        if "EXPIRED" in reason:
            return "the server refused our client certificate: it has expired"
        if "CERTIFICATE_REQUIRED" in reason:
            return "the server requires a client certificate"
        if "CERTIFICATE" in reason or "BAD_CERT" in reason or "DECRYPT" in reason or "HANDSHAKE" in reason:
            return f"the server refused our client certificate ({exc.reason})"
        if "PROTOCOL_VERSION" in reason:
            return "the server does not speak TLS 1.3"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return "the server does not speak TLS there (a plain-text port?)"
    return str(exc.reason or exc)
