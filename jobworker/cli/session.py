"""
One C{jobcli} command's session with one server: the L{Command} (its
arguments, console and connection, opened on first use), which servers
C{--server} names, and the keep-alive to use.
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Sequence
from typing import Any

from jobworker.blocking import BlockingClient, parse_address
from jobworker.cli.output import Console
from jobworker.cli.parser import UsageError, parse_seconds
from jobworker.clientside.config import ClientConfigError, Target, load_client_config, resolve_targets


def keepalive_seconds(args: argparse.Namespace) -> float:
    if args.keepalive is not None:
        seconds: float = args.keepalive
        return seconds
    text = os.environ.get("JOBWORKER_KEEPALIVE") or "30"
    try:
        return parse_seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"JOBWORKER_KEEPALIVE: {exc}") from None


def targets_from_args(args: argparse.Namespace) -> list[Target]:
    try:
        config = load_client_config()
        return resolve_targets(config, server=args.server, ca=args.ca, cert=args.cert, key=args.key)
    except ClientConfigError as exc:
        raise UsageError(str(exc)) from None


def connect_target(args: argparse.Namespace, target: Target) -> BlockingClient:
    from jobworker.blocking.tls import ClientTLSError, client_ssl_context

    try:
        address = parse_address(target.address.value)
    except ValueError:
        raise UsageError(
            f"{target.address.value!r} ({target.address.source}) is not a server of the config file "
            "nor an address (HOST[:PORT], [IPv6]:PORT)"
        ) from None
    try:
        context = client_ssl_context(target.ca.value, target.cert.value, target.key.value)
    except ClientTLSError as exc:
        raise UsageError(str(exc)) from None
    return BlockingClient(address, context, keepalive_interval=keepalive_seconds(args))


class Command:
    """
    One command against one server: its arguments, where its output goes,
    and the connection (opened on first use).
    """

    def __init__(self, args: argparse.Namespace, target: Target, console: Console) -> None:
        self.args = args
        self.target = target
        self.console = console
        self.results: list[Any] = []  # what --json prints, one per result
        # Whether the command printed its JSON itself, as it went (a list,
        # page by page), so that there are no results left to print.
        self.json_printed = False
        self._client: BlockingClient | None = None

    @property
    def client(self) -> BlockingClient:
        if self._client is None:
            client = connect_target(self.args, self.target)
            client.connect()
            self._client = client
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def job_ids(self, texts: Sequence[str]) -> list[uuid.UUID]:
        return self.client.resolve_job_ids(texts)
