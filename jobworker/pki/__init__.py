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

Where it lives: making certificates in L{jobworker.pki.certificates},
writing them in L{jobworker.pki.files}, the command in
L{jobworker.pki.command}; their public names (and the reading functions of
L{jobworker.credentials}) are re-exported here.
"""

from __future__ import annotations

from jobworker.credentials import CredentialError, read_certificates, read_credentials
from jobworker.pki.certificates import ROLES, make_ca, make_client_cert, make_dev_pki, make_server_cert, sign_csr
from jobworker.pki.command import main

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
