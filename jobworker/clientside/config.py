"""
The client's configuration file: named servers and their credentials.

    # ~/.config/jobworker/config.toml
    default = "lab"

    [defaults]                 # credentials of every server without its own
    ca = "pki/ca.pem"          # relative paths: to this file's directory
    cert = "pki/alice.pem"
    key = "pki/alice.key"

    [servers.lab]
    address = "lab.example.org:8443"

    [servers.prod]
    address = "10.1.2.3:8443"
    cert = "~/prod/alice.pem"  # ~ is the home directory
    key = "~/prod/alice.key"

The file is C{$JOBWORKER_CONFIG} when set, else
C{$XDG_CONFIG_HOME/jobworker/config.toml}, else
C{~/.config/jobworker/config.toml}; a missing file is an empty
configuration, so C{jobcli} without one behaves as it always has.

Which server and credentials a command uses (L{resolve_targets}), first
match wins:

  - the server: C{--server}, else C{$JOBWORKER_SERVER}, else the file's
    C{default}, else C{localhost:8443}.  A value that names a server of the
    file is that server; any other value is an address (C{HOST[:PORT]}, or
    what else L{jobworker.blocking.parse_address} accepts).  A comma
    separated list names several servers (C{jobcli --server a,b status}).
  - each of CA, certificate and key: C{--ca}/C{--cert}/C{--key}, else
    C{$JOBWORKER_CA}/C{$JOBWORKER_CERT}/C{$JOBWORKER_KEY}, else the named
    server's own, else the file's C{[defaults]}, else the development PKI
    in C{./certs} (C{certs/ca.pem}, C{certs/admin.pem},
    C{certs/admin.key}).

Every resolved value carries where it came from, for C{jobcli config}.

Only the standard library is used (C{tomllib}), so reading the file costs
C{jobcli} about a millisecond of start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ClientConfig",
    "ClientConfigError",
    "ServerEntry",
    "Setting",
    "Target",
    "config_path",
    "load_client_config",
    "resolve_targets",
]

DEFAULT_ADDRESS = "localhost:8443"
DEFAULT_CREDENTIALS = {"ca": "certs/ca.pem", "cert": "certs/admin.pem", "key": "certs/admin.key"}
CREDENTIALS = ("ca", "cert", "key")
ENV_NAMES = {"ca": "JOBWORKER_CA", "cert": "JOBWORKER_CERT", "key": "JOBWORKER_KEY"}

# More servers than this in one --server list is a typo or a fleet that wants
# an orchestrator; it also bounds how many connections one command opens.
MAX_TARGETS = 256


class ClientConfigError(Exception):
    """
    The configuration file cannot be read or holds something wrong; the
    message names the file and the key.
    """


@dataclass(frozen=True)
class ServerEntry:
    """
    One C{[servers.NAME]} table; paths are absolute (or None: not given).
    """

    name: str
    address: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ClientConfig:
    """
    A parsed configuration file; C{path} is None when there was none.
    """

    path: str | None = None
    default: str | None = None
    defaults: Mapping[str, str] = field(default_factory=dict)
    servers: Mapping[str, ServerEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    """
    A resolved value and where it came from (C{"--ca"},
    C{"$JOBWORKER_CA"}, C{"server lab in /home/a/.config/..."}, C{"built-in
    default"}).
    """

    value: str
    source: str


@dataclass(frozen=True)
class Target:
    """
    One server to talk to: its name (the file's name, or the address as
    given) and the address and credentials to use.
    """

    name: str
    address: Setting
    ca: Setting
    cert: Setting
    key: Setting
    configured: bool  # a server of the configuration file


def config_path(environ: Mapping[str, str] | None = None) -> str:
    """
    Where the configuration file is looked for (see the module docstring).
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get("JOBWORKER_CONFIG")
    if explicit:
        return os.path.expanduser(explicit)
    base = environ.get("XDG_CONFIG_HOME")
    if not base or not os.path.isabs(base):
        # The XDG spec: a relative value is invalid and is ignored.
        base = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "jobworker", "config.toml")


def load_client_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> ClientConfig:
    """
    Read the configuration file at C{path} (default L{config_path}); a file
    that does not exist is an empty configuration.

    @raise ClientConfigError: the file cannot be read, is not TOML, or has
        an unknown key, a value of the wrong type or a default that names no
        server.
    """
    # os.path, not pathlib: pathlib's imports cost jobcli 5 ms of start-up.
    path = os.fspath(path) if path is not None else config_path(environ)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        return ClientConfig()
    except OSError as exc:
        raise ClientConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    import tomllib  # only when there is a file: it costs a few ms to import

    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ClientConfigError(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClientConfigError(f"{path} is not valid TOML: {exc}") from None
    return _parse(path, document)


def _parse(path: str, document: dict[str, Any]) -> ClientConfig:
    base = os.path.dirname(os.path.abspath(path))

    def fail(message: str) -> ClientConfigError:
        return ClientConfigError(f"{path}: {message}")

    def text(where: str, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise fail(f"{where} must be a non-empty string")
        return value

    def credentials(where: str, table: dict[str, Any], allowed: set[str]) -> dict[str, str]:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise fail(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(allowed))})")
        found = {}
        for name in CREDENTIALS:
            if name in table:
                found[name] = os.path.join(base, os.path.expanduser(text(f"{where}.{name}", table[name])))
        return found

    unknown = sorted(set(document) - {"default", "defaults", "servers"})
    if unknown:
        raise fail(f"unknown key {unknown[0]} (known: default, defaults, servers)")
    defaults_table = document.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise fail("defaults must be a table")
    defaults = credentials("defaults", defaults_table, set(CREDENTIALS))
    servers_table = document.get("servers", {})
    if not isinstance(servers_table, dict):
        raise fail("servers must be a table of [servers.NAME] tables")
    servers = {}
    for name, table in servers_table.items():
        where = f"servers.{name}"
        if not isinstance(table, dict):
            raise fail(f"{where} must be a table")
        if not name or "," in name or name != name.strip():
            raise fail(f"{where}: a server name must be non-empty, without commas or surrounding spaces")
        given = credentials(where, table, {"address", *CREDENTIALS})
        if "address" not in table:
            raise fail(f"{where} has no address")
        servers[name] = ServerEntry(name, text(f"{where}.address", table["address"]), **given)
    default = document.get("default")
    if default is not None:
        default = text("default", default)
        if default not in servers:
            raise fail(f"default {default!r} names no [servers.{default}] table")
    return ClientConfig(path, default, defaults, servers)


def resolve_targets(
    config: ClientConfig,
    *,
    server: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Target]:
    """
    The servers a command talks to and the credentials for each, from the
    flags given (None: not given), the environment and C{config}, in the
    order of the module docstring.

    @raise ClientConfigError: an empty name in a list, or more than
        L{MAX_TARGETS} servers.
    """
    environ = os.environ if environ is None else environ
    if server:
        spec, spec_source = server, "--server"
    elif environ.get("JOBWORKER_SERVER"):
        spec, spec_source = environ["JOBWORKER_SERVER"], "$JOBWORKER_SERVER"
    elif config.default:
        spec, spec_source = config.default, f"default in {config.path}"
    else:
        spec, spec_source = DEFAULT_ADDRESS, "built-in default"
    # A name of the file may not contain a comma, and an address never
    # does, so a comma always separates servers.
    names = [item.strip() for item in spec.split(",")] if "," in spec else [spec]
    if any(not item for item in names):
        raise ClientConfigError(f"{spec_source} {spec!r}: an empty server name in the list")
    if len(names) > MAX_TARGETS:
        raise ClientConfigError(f"{spec_source}: {len(names)} servers; at most {MAX_TARGETS} at once")
    flags = {"ca": ca, "cert": cert, "key": key}
    targets = []
    seen = set()
    for name in names:
        if name in seen:
            continue  # one connection per server, however often it is named
        seen.add(name)
        entry = config.servers.get(name)
        if entry is not None:
            address = Setting(entry.address, f"server {name} in {config.path} (chosen by {spec_source})")
        else:
            address = Setting(name, spec_source)
        chosen = {}
        for item in CREDENTIALS:
            own = getattr(entry, item) if entry is not None else None
            flag = flags[item]
            if flag:
                chosen[item] = Setting(flag, f"--{item}")
            elif environ.get(ENV_NAMES[item]):
                chosen[item] = Setting(environ[ENV_NAMES[item]], f"${ENV_NAMES[item]}")
            elif own:
                chosen[item] = Setting(own, f"server {name} in {config.path}")
            elif item in config.defaults:
                chosen[item] = Setting(config.defaults[item], f"[defaults] in {config.path}")
            else:
                chosen[item] = Setting(DEFAULT_CREDENTIALS[item], "built-in default (the development PKI in ./certs)")
        targets.append(Target(name, address, configured=entry is not None, **chosen))
    return targets
