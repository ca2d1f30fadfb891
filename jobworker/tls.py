"""
Mutual TLS for the Twisted server and the embeddable Twisted client, and the
identity a peer's certificate carries.

The policy, on both sides:

  - TLS 1.3 and nothing else; the server prefers AES-128-GCM (see
    L{TLS13_CIPHERSUITES}).
  - Trust only the CA certificates in the file given, never the system's
    roots: the service's CA is private, and a certificate some public CA
    issued to anybody must not open it.
  - The server demands a client certificate that chains to that CA, is
    valid now, and names C{clientAuth} in its extended key usage.  OpenSSL
    alone accepts a client certificate without any extended key usage
    extension, so the server checks that itself (L{_verify_client}); a
    certificate meant for a web server or for e-mail is not a client
    credential here.  A client refused for that gets an C{internal_error}
    alert, since pyOpenSSL's verify callback cannot give OpenSSL a reason;
    the server logs the real one.  In TLS 1.3 the client has finished its
    handshake by then and sees the alert on its first read.
  - The server keeps no sessions and issues no stateless session tickets,
    so every connection is a full handshake that verifies the client
    certificate afresh.  (OpenSSL still sends TLS 1.3 C{NewSessionTicket}
    messages holding a session id for its cache; with the cache off they
    resume nothing.  Stopping them needs C{SSL_CTX_set_num_tickets}, which
    pyOpenSSL does not offer, nor the binding under it: the OpenSSL that
    C{cryptography} links in statically does not export it.)
  - Key exchange with X25519 or P-256 only (L{KEY_EXCHANGE_GROUPS}).
  - The client checks that the server's certificate names the host it
    dialled, a DNS name or an IP address, using C{service_identity}.

Certificates and keys are read once, when the options are made, and any
problem is raised then as L{CredentialError}, naming the file.  Keys of any
kind work (RSA from an organisation's own C{openssl} CA as well as the ECDSA
keys that L{jobworker.pki} makes); the reading itself is
L{jobworker.credentials}, shared with the PKI tool.

Why one module for both sides, not C{server/tls.py} and C{client/tls.py}:
the policy above is one contract that both ends must agree on (the same
version, suites and groups, the same CA-only trust), and the client half is
one function over the same reading of credentials; split, the two halves
would drift apart.  The server-only pieces (the bulk-write TLS protocol,
L{_verify_client}, L{peer_names}) are small and about TLS, not about
connections.  The blocking client cannot share it: it speaks TLS through
the standard library's C{ssl}, not pyOpenSSL (see L{jobworker.blocking}).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.audit import log_value
from jobworker.credentials import (
    CredentialError,
    StrPath,
    read_certificates,
    read_credentials,
)

__all__ = [
    "BulkTLSMemoryBIOFactory",
    "drop_traceback",
    "CredentialError",
    "server_tls_options",
    "client_tls_options",
    "peer_names",
]

_log = Logger()

# The server's order of preference.  All three are TLS 1.3's standard
# suites; AES-128-GCM comes first because with AES instructions it costs
# both ends the least per byte (ten AES rounds to AES-256's fourteen), which
# matters to a service that streams output at hundreds of MB/s; Go's TLS
# stack makes the same choice.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# The key exchange groups the server accepts, in its order of preference:
# X25519 (fast, constant time, what every current client offers first) and
# P-256 (for clients limited to NIST curves).  The finite-field groups
# (ffdhe2048..8192) cost many times more per handshake for no security a
# 128-bit suite needs, and the other curves add code paths nobody needs;
# a client that offers none of these two is refused.
KEY_EXCHANGE_GROUPS = b"X25519:P-256"


class BulkTLSMemoryBIOProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS protocol with one C{SSL_write} per write instead of one
    per 16 KiB record.

    Twisted cuts every write into 16 KiB slices and, after each, reads up to
    32 KiB of ciphertext out of the memory BIO: for a server streaming
    hundreds of MB/s that is four round trips through Python per 64 KiB
    frame, each with a copy of its slice.  OpenSSL cuts the records itself,
    and a memory BIO never refuses a write, so one C{SSL_write} takes the
    whole buffer (once the server's context allows whole writes, see
    L{_write_whole_buffers}); the ciphertext then comes out in one read.

    The ciphertext goes to the socket at once when the TCP transport holds
    nothing (L{write_through}), saving a turn of the reactor per write.

    Everything else, errors included, is Twisted's: the two methods below
    keep the contract of the ones they replace (C{WantReadError} buffers
    the rest until the peer speaks, any other error ends the connection).
    """

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        while view:
            try:
                sent = self._tlsConnection.send(view)
            except SSL.WantReadError:
                self._bufferedWrite(bytes(view))  # type: ignore[no-untyped-call]  # Twisted's, unannotated
                break
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                break
            view = view[sent:]
            self._flushSendBIO(len(data))

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        super()._tlsShutdownFinished(reason)  # type: ignore[no-untyped-call]  # Twisted's, unannotated
        if reason is not None:
            # The failure holds the traceback of the TLS error, whose frames
            # hold the failure (a local of Twisted's) and both transports: a
            # cycle that would keep a dead connection's buffers until the
            # garbage collector's next full pass.  What it says (the type,
            # the message, the frames as text) is kept.
            drop_traceback(reason)

    def _flushSendBIO(self, hint: int = 0) -> None:
        # Ciphertext is the plaintext plus 22 bytes per record of at most
        # 16 KiB; read it all, however much the last write made.
        size = hint + (hint >> 14) * 22 + 4096 if hint else 2**15
        scratch = _cipher_scratch() if size <= CIPHER_SCRATCH else None
        bio = getattr(self._tlsConnection, "_from_ssl", None)
        if scratch is None or bio is None:
            self._flushSendBIOCopying(size)
            return
        buffer, pointer = scratch
        view = memoryview(buffer)
        while True:
            read = _openssl_lib.BIO_read(bio, pointer, size)
            if read <= 0:
                try:
                    self._tlsConnection._handle_bio_errors(bio, read)
                except SSL.WantReadError:
                    pass  # the BIO is empty
                return
            write_through(self.transport, view[:read])
            if read < size:
                return

    def _flushSendBIOCopying(self, size: int) -> None:
        # pyOpenSSL's own read: a fresh buffer and a copy of it per read.
        while True:
            try:
                data = self._tlsConnection.bio_read(size)
            except SSL.WantReadError:
                return  # the BIO is empty
            write_through(self.transport, data)
            if len(data) < size:
                return


# The ciphertext of one write is read out of OpenSSL's memory BIO into this
# buffer, one per thread (a reactor's), reused for every connection, and
# sent to the socket from it: pyOpenSSL's bio_read allocates a fresh buffer
# per read and copies it into a new bytes object, a quarter of a MiB twice
# per turn of a streaming connection, which glibc kept giving back to the
# kernel and taking again (two page faults per 4 KiB sent).  Only what the
# kernel does not take at once is copied (the transport keeps it).  A
# stream's turn (TURN_BYTES of output) fits; a larger write (a long answer)
# takes the copying read, so one write still makes one transport write.
CIPHER_SCRATCH = 320 << 10  # a turn (256 KiB and its heads) sealed in 16 KiB records, and room
_scratch = threading.local()
try:
    from OpenSSL._util import ffi as _openssl_ffi, lib as _openssl_lib
except ImportError:  # a pyOpenSSL without the binding: the copying read
    _openssl_lib = None


def _cipher_scratch() -> tuple[bytearray, Any] | None:
    if _openssl_lib is None:
        return None
    scratch = getattr(_scratch, "buffer", None)
    if scratch is None:
        buffer = bytearray(CIPHER_SCRATCH)
        scratch = _scratch.buffer = (buffer, _openssl_ffi.from_buffer("char[]", buffer))
    return scratch


def drop_traceback(failure: Failure) -> None:
    """
    Let go of C{failure}'s traceback object (and so of the frames, and
    everything their locals hold), keeping what it says: its type, value
    and the frames as text.  As C{Failure.cleanFailure}, without replacing
    the failure's state.
    """
    failure.tb = None
    value = failure.value
    if isinstance(value, BaseException):
        value.__traceback__ = None


def write_through(transport: Any, data: bytes | memoryview) -> None:
    """
    Write C{data} to a TCP transport, straight to the socket when the
    transport holds nothing.

    A Twisted TCP transport only buffers a write and has the reactor watch
    the socket; the C{send} comes on a later turn, after which the transport
    stops watching again: two C{epoll_ctl} calls and a turn of the reactor
    for every write.  A streaming connection's writes mostly find the buffer
    empty and the kernel with room, so this sends at once what the kernel
    takes and gives only the rest to C{transport.write}, which handles it
    (and every error: a failed send is simply met again there) as before.
    Whenever the transport holds anything, everything goes through
    C{write}, so the order of the bytes is kept.

    This reads Twisted's C{FileDescriptor} state (C{dataBuffer}, C{offset},
    C{_tempDataLen}, and C{_aborting}: an aborted connection sends nothing
    more); a transport without it (an in-memory one in tests, or a later
    Twisted) gets a plain C{write}.
    """
    try:
        idle = (
            transport.connected
            and not transport.disconnecting
            and not transport._aborting
            and not transport._writeDisconnected
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
        )
        send = transport.writeSomeData
    except AttributeError:
        idle = False
    if idle:
        sent = send(data)
        # 0: the kernel had no room; an exception: the connection broke.
        if isinstance(sent, int) and sent > 0:
            if sent >= len(data):
                return
            data = data[sent:]
    # The transport keeps what it is given: a view of a reused buffer is
    # copied.
    transport.write(data if isinstance(data, bytes) else bytes(data))


class BulkTLSMemoryBIOFactory(TLSMemoryBIOFactory):
    protocol = BulkTLSMemoryBIOProtocol


def server_tls_options(
    ca_path: StrPath, cert_path: StrPath, key_path: StrPath
) -> IOpenSSLServerConnectionCreator:
    """
    TLS settings for the server, for L{TLSMemoryBIOFactory
    <twisted.protocols.tls.TLSMemoryBIOFactory>}, C{listenSSL} or an SSL
    server endpoint.

    @param ca_path: PEM file of the CA certificates that client certificates
        must chain to.
    @param cert_path: PEM file of the server's certificate, followed by any
        intermediates.
    @param key_path: PEM file of the server's unencrypted private key.
    @raise CredentialError: a file cannot be read or is not what it should
        be, or the key does not belong to the certificate.
    """
    authorities = read_certificates(ca_path)
    chain, key = read_credentials(cert_path, key_path)

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _offer_groups(context, KEY_EXCHANGE_GROUPS)
    context.use_certificate(chain[0])
    for intermediate in chain[1:]:
        context.add_extra_chain_cert(intermediate)
    # pyOpenSSL's annotation predates cryptography's ML-DSA keys; it raises
    # TypeError for a key type it cannot use.
    context.use_privatekey(key)  # type: ignore[arg-type]
    store = context.get_cert_store()
    assert store is not None, "a new SSL.Context always has a certificate store"
    for authority in authorities:
        store.add_cert(X509.from_cryptography(authority))
        # Tell clients which CAs we accept, so that one holding several
        # certificates can pick the right one.
        context.add_client_ca(authority)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_client)
    _write_whole_buffers(context)
    return _ServerTLSOptions(context)


def _offer_groups(context: SSL.Context, groups: bytes) -> None:
    """
    Accept only C{groups} (OpenSSL's names, colon separated) for the key
    exchange.

    pyOpenSSL has no method for it (C{set_tmp_ecdh} picks one curve for TLS
    1.2 only); C{SSL_CTX_set1_curves_list}, which OpenSSL 3 and later apply
    to every group, finite-field ones included, is in the binding pyOpenSSL
    uses.  Unlike L{_write_whole_buffers} this is a security setting, so its
    absence is an error, not a warning.
    """
    from OpenSSL._util import lib

    if lib.SSL_CTX_set1_curves_list(context._context, groups) != 1:
        raise RuntimeError(f"OpenSSL refused the key exchange groups {groups.decode()}")


def _write_whole_buffers(context: SSL.Context) -> None:
    """
    Let one C{SSL_write} encrypt a whole buffer, as L{BulkTLSMemoryBIOProtocol}
    expects.

    pyOpenSSL turns on C{SSL_MODE_ENABLE_PARTIAL_WRITE} for every context,
    which makes C{SSL_write} stop after each 16 KiB record, and it offers no
    way to turn a mode off; so this goes through the OpenSSL binding that
    pyOpenSSL itself uses.  Partial writes only matter to a socket BIO that
    can refuse bytes; a memory BIO never does.  Should a later pyOpenSSL
    move these names, this does nothing and writes are simply cut per record
    again (the test suite notices).
    """
    try:
        from OpenSSL._util import lib

        lib.SSL_CTX_clear_mode(context._context, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on pyOpenSSL
        _log.warn("TLS writes are cut per record: {error}", error=repr(exc))


def client_tls_options(
    ca_path: StrPath, cert_path: StrPath, key_path: StrPath, hostname: str
) -> IOpenSSLClientConnectionCreator:
    """
    TLS settings for a Twisted client, for L{wrapClientTLS
    <twisted.internet.endpoints.wrapClientTLS>}, C{connectSSL} or an SSL
    client endpoint.

    @param ca_path: PEM file of the CA certificates that the server's
        certificate must chain to.
    @param cert_path: PEM file of the client's certificate, followed by any
        intermediates.
    @param key_path: PEM file of the client's unencrypted private key.
    @param hostname: the name the client dialled, a DNS name or an IPv4 or
        IPv6 address; the server's certificate must carry it as a subject
        alternative name.  A DNS name is also sent as SNI; an address, as
        the TLS specification says, is not.
    @raise CredentialError: a file cannot be read or is not what it should
        be, or the key does not belong to the certificate.
    """
    authorities = read_certificates(ca_path)
    chain, key = read_credentials(cert_path, key_path)
    return optionsForClientTLS(
        hostname,
        trustRoot=trustRootFromCertificates(
            [Certificate(X509.from_cryptography(authority)) for authority in authorities]
        ),
        extraCertificateOptions={
            # Given here rather than as clientCertificate, which would hand
            # pyOpenSSL the X509 and PKey objects it has deprecated; the
            # context accepts cryptography's objects as they are.
            "certificate": chain[0],
            "privateKey": key,
            "extraCertChain": chain[1:],
            "raiseMinimumTo": TLSVersion.TLSv1_3,
            "lowerMaximumSecurityTo": TLSVersion.TLSv1_3,
        },
    )


def peer_names(
    certificate: X509 | x509.Certificate | None,
) -> tuple[str | None, str | None]:
    """
    The identity in a peer's certificate: the subject's common name (who)
    and organizational unit (the role).

    @param certificate: as C{transport.getPeerCertificate()} returns it (a
        pyOpenSSL L{X509}, or L{None} before or without a handshake), or a
        C{cryptography} certificate.
    @return: C{(cn, ou)}.  Either is L{None} when the subject has no such
        attribute, an empty one, or more than one: a certificate naming two
        users or two roles names nobody, rather than whichever comes first.
    """
    if certificate is None:
        return None, None
    if isinstance(certificate, X509):
        certificate = certificate.to_cryptography()
    subject = certificate.subject
    return (
        _only_value(subject, NameOID.COMMON_NAME),
        _only_value(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
    )


def _only_value(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attributes: Sequence[x509.NameAttribute[str | bytes]] = name.get_attributes_for_oid(oid)
    if len(attributes) != 1:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) and value else None


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class _ServerTLSOptions:
    """
    Server connections sharing one context, made once.

    pyOpenSSL forbids changing a context after it has made a connection, so
    the context is complete before this object exists.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def getContext(self) -> SSL.Context:
        # For code that still takes an old-style context factory.
        return self._context


def _peer_of(connection: SSL.Connection) -> str:
    """
    The address of the peer of a TLS connection: Twisted keeps the
    connection's protocol as its application data.
    """
    try:
        protocol = connection.get_app_data()
        peer = protocol.transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


def _verify_client(
    connection: SSL.Connection, certificate: X509, error: int, depth: int, ok: int
) -> bool:
    """
    OpenSSL's verify callback on the server, called for each certificate of
    the client's chain with OpenSSL's own verdict in C{ok}.

    Keeps every refusal of OpenSSL's (unknown CA, expired, wrong purpose) and
    refuses, in addition, a client certificate (depth 0) whose extended key
    usage does not name C{clientAuth}, including one without the extension,
    which OpenSSL would accept for any purpose.  C{anyExtendedKeyUsage} is
    not enough either: a client certificate must say it is one.
    """
    if not ok:
        return False
    if depth > 0:
        return True
    try:
        leaf = certificate.to_cryptography()
        try:
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.CLIENT_AUTH in usages:
            return True
        _log.warn(
            "refused client certificate {subject} from {peer}: its extended key usage"
            " does not include clientAuth",
            subject=log_value(leaf.subject.rfc4514_string()),
            peer=_peer_of(connection),
        )
    except Exception:
        # An exception escaping into OpenSSL would be re-raised later from an
        # unrelated pyOpenSSL call; a certificate we cannot read is refused.
        _log.failure("while checking a client certificate's extended key usage")
    return False
