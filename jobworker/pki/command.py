"""
The C{jobworker-pki} command (its usage: L{jobworker.pki}).  Entry point:
C{jobworker.pki:main}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jobworker import __version__
from jobworker.pki.certificates import ROLES, make_ca, make_client_cert, make_dev_pki, make_server_cert, sign_csr

__all__ = ["main"]


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
