"""
The layering guard (issue 15, item 1): imports point downwards only, and no
module reaches into another's private names.

Every module of C{jobworker/} is parsed with C{ast}; nothing is imported or
run.  The checks:

  - L{LAYERS} gives every module a tier.  An import from one unit (a
    module or package named in the table) to another must go to a lower
    tier; units of the same tier are peers and import nothing of each
    other (the Twisted client and the blocking client, for instance).
    Imports inside a unit are the unit's own business.  Imports under
    C{if TYPE_CHECKING:} and inside functions count too: a lazy import is
    still a dependency.  L{UPWARD_IMPORTS} lists the exceptions, each
    with its reason (none today).
  - Inside the packages of L{INNER_ORDER} (protocol, jobs, server, both
    clients) run-time imports point down the package's own order, the one
    its docstring gives.
  - The pure core and the host adapters import no Twisted (nor zope,
    pyOpenSSL, service_identity), anywhere; the core also touches no
    I/O module (sockets, processes, files, threads, the clock).
  - The pure modules above the core (L{PURE_MODULES}: admission, the life
    cycle, the procfs parsers...) import no Twisted and no I/O module, and
    from jobworker only the core and each other.
  - C{jobworker.cli} and C{jobworker.blocking} load none of Twisted,
    pyOpenSSL, cryptography, zope or service_identity when they are
    imported (the transitive closure of their module-level imports):
    C{jobcli} starts in tens of milliseconds because of it.
  - A private module (C{_name.py}) is imported only from inside its own
    package (C{host/cgroups/_host} by C{host/cgroups/v1}); a private name
    (C{_name}) defined in one module is used by no other, neither as
    C{from X import _name} nor as C{something._name}.
    A C{something._name} is judged by name, not by type (this is C{ast},
    not a type checker): it is a reach across modules when the module
    using it does not define C{_name} itself and another jobworker module
    does.  Two modules that both define a C{_state} can still reach into
    each other's unseen; a shared name like that is worth a rename.
  - Private names of other projects (Twisted's internals, argparse's) are
    used only where L{FOREIGN_PRIVATES} says so, with the reason.
  - C{CONTRIBUTING.md}'s Layer map names every module, and no file that
    is gone.

The checkers are plain functions over a source tree, and the last tests
run them on a small made-up tree with one bad import of each kind, so that
they are seen to fail.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO

# -- the layer table -------------------------------------------------------------

# Tiers from the bottom up: (layer, {unit: its concern}).  A unit is a
# module or a package (a package stands for everything in it); a module
# belongs to the longest unit its name starts with.  The root package
# "jobworker" stands for jobworker/__init__.py alone (the version).
LAYERS: list[tuple[str, dict[str, str]]] = [
    ("core", {
        "jobworker": "the version (__version__), nothing else",
        "jobworker.errors": "error codes and the exceptions that carry them",
        # Pure (quoting, a rate limit on a clock passed in), so core rather
        # than glue: the server's glue and tls use it, it uses nothing.
        "jobworker.audit": "the audit line of a request: quoting of client strings, the rate limit",
        # Placed by what it is, not by its directory: the helper contract
        # imports nothing at all (checked below), and it must sit beside
        # host/isolate.py because the helper, run as `python -I -S
        # isolate.py`, loads it as its sibling file.  Moving it lower would
        # mean two copies of the contract again (issue 15, item 3).
        "jobworker.host.contract": "the contract with the isolation helper: config keys, status words, exit codes",
    }),
    ("core", {
        "jobworker.limits": "resource limits: parsing, checking, caps",
        "jobworker.policy": "who may do what (authorization)",
        "jobworker.jobnames": "job names and labels: syntax, caps, list filters",
    }),
    ("core", {
        "jobworker.protocol": "the wire protocol, sans I/O: messages, wire codec, framing, flow, keep-alive, connection",
    }),
    ("core", {
        "jobworker.records": "a job's persisted record (JSON) and the exit status jobcli reports",
    }),
    ("host", {
        "jobworker.host": "the host package itself (its docstring)",
        "jobworker.host.cgroups": "cgroup v1 and v2 drivers, the host calls and /proc parsing under them",
        "jobworker.host.isolate": "the isolation helper: namespaces, mounts, uid, exec (a program of its own)",
        "jobworker.host.uids": "the per-job uid allocator",
        "jobworker.host.memory": "returning freed memory to the system",
        "jobworker.output": "a job's output: the in-memory log with cursors, and its on-disk spool",
    }),
    ("glue", {
        "jobworker.logs": "twisted.logger set-up and the structured log",
        "jobworker.credentials": "reading certificates and keys from files",
    }),
    ("glue", {
        "jobworker.tls": "the TLS policy of the server and the Twisted client (pyOpenSSL)",
    }),
    ("glue", {
        "jobworker.jobs": "admission, the helper's start, the life cycle, the manager, the job store",
    }),
    ("glue", {
        "jobworker.server": "connections, streams, requests, timers, the factory, options and the twistd service",
    }),
    ("front", {
        "jobworker.clientside": "what both clients share: job references, addresses, the client config file",
    }),
    ("front", {
        "jobworker.client": "the Twisted client library",
        "jobworker.blocking": "the blocking client library (stdlib ssl, no Twisted)",
        "jobworker.pki": "the jobworker-pki tool",
    }),
    ("front", {
        "jobworker.cli": "jobcli and its shell completion",
        "jobworker.testing": "an in-memory server and client for tests of code that uses the client",
    }),
]

# Inside a package too, imports point down (bottom-up tiers of its modules;
# peers import nothing of each other).  The package's __init__ sits above
# them all (it re-exports).  Imports under TYPE_CHECKING are exempt here:
# they only name a type for an annotation (timers naming its ServerFactory)
# and never run.  A new module of one of these packages must be placed.
INNER_ORDER: dict[str, list[list[str]]] = {
    "jobworker.protocol": [["messages", "flow", "keepalive"], ["statuses"], ["wire"], ["framing", "listing"], ["connection"]],
    "jobworker.jobs": [
        ["spec", "lifecycle", "fate", "config", "store", "report", "timers", "pacing"], ["admission", "pipes"], ["helper", "supervisor"], ["job"],
        ["persistence"], ["manager"],
    ],
    "jobworker.server": [
        ["transport", "streams", "options", "reaping"], ["timers"], ["requests"], ["connection"], ["factory"], ["service"],
    ],
    "jobworker.client": [["errors", "follower"], ["protocol"], ["connect"]],
    "jobworker.blocking": [["channel", "tls"], ["connection"], ["client"]],
}

# (importing module, imported module): why this import may point upwards or
# sideways.  Keep it empty: fix the import rather than list it.
UPWARD_IMPORTS: dict[tuple[str, str], str] = {}

# The layers in order; a layer's tiers are consecutive in LAYERS.
LAYER_ORDER = ("core", "host", "glue", "front")

# Libraries the core and the host adapters never import: the reactor and
# its companions belong to the glue.
TWISTED_WORLD = frozenset({"twisted", "zope", "OpenSSL", "service_identity"})

# What the pure core never touches: I/O of every kind and the clock.  (The
# wire codec's io.BytesIO and framing's mmap buffer are memory, not I/O.)
IO_MODULES = frozenset({
    "os", "posix", "socket", "ssl", "select", "selectors", "subprocess", "threading", "asyncio",
    "pathlib", "shutil", "tempfile", "signal", "time", "fcntl", "multiprocessing", "logging",
})

# Modules above the core that are pure all the same (their docstrings say
# so, and their tests need no reactor): they import no Twisted and no I/O
# module, and from jobworker only the core and each other.
PURE_MODULES: dict[str, str] = {
    "jobworker.jobs.admission": "admit(): everything about a start request before any host call",
    "jobworker.jobs.spec": "a job as admitted (JobSpec)",
    "jobworker.jobs.lifecycle": "a job's life cycle as a transition table",
    "jobworker.jobs.fate": "how a job ended, from what its helper and its cgroup said",
    # Not jobworker.output.log: its time marks' clock defaults to
    # time.time_ns (injectable, but the default reads the wall clock).
    "jobworker.host.cgroups._procfs": "the parsers of /proc/self/cgroup and /proc/self/mountinfo",
}

# What jobcli (jobworker.cli) and the blocking client must not load when
# imported: each costs tens of milliseconds of start-up.
HEAVY_AT_IMPORT = TWISTED_WORLD | {"cryptography"}
LIGHT_FRONT_ENDS = ("jobworker.cli", "jobworker.blocking")

# (module, private attribute of another project): why it is used.  os._exit
# and posix._exit are documented, public functions and are always allowed.
ALWAYS_ALLOWED_PRIVATES = frozenset({"_exit", "_replace", "_asdict", "_fields", "_make"})
FOREIGN_PRIVATES: dict[tuple[str, str], str] = {
    ("jobworker.cli.completion", "_actions"): "argparse has no public way to walk a parser's options",
    ("jobworker.cli.completion", "_SubParsersAction"): "argparse has no public way to find the subcommands",
    ("jobworker.host.isolate", "_signal"): "the helper imports the C modules, not signal/json/ctypes (ms per job)",
    ("jobworker.host.isolate", "_json"): "the helper imports the C modules, not signal/json/ctypes (ms per job)",
    ("jobworker.host.isolate", "_ctypes"): "the helper imports the C modules, not signal/json/ctypes (ms per job)",
    ("jobworker.host.isolate", "_socket"): "the supervisor imports the C socket module, not socket.py (ms per job)",
    ("jobworker.host.isolate", "_accept"): "the C socket's accept: the supervisor imports _socket, not socket.py",
    ("jobworker.host.isolate", "_SimpleCData"): "the helper imports the C modules, not signal/json/ctypes (ms per job)",
    ("jobworker.tls", "_util"): "SSL_CTX_set1_curves_list is not in pyOpenSSL's API; its binding is OpenSSL._util.lib",
    ("jobworker.tls", "_context"): "the SSL_CTX that OpenSSL._util.lib calls take (see _util)",
    ("jobworker.tls", "_tlsConnection"): "the write path replaces TLSMemoryBIOProtocol._write, keeping its contract",
    ("jobworker.tls", "_lostTLSConnection"): "the write path replaces TLSMemoryBIOProtocol._write, keeping its contract",
    ("jobworker.tls", "_bufferedWrite"): "the write path replaces TLSMemoryBIOProtocol._write, keeping its contract",
    ("jobworker.tls", "_tlsShutdownFinished"): "the write path replaces TLSMemoryBIOProtocol._write, keeping its contract",
    ("jobworker.tls", "_write"): "the write path replaces TLSMemoryBIOProtocol._write, keeping its contract",
    ("jobworker.tls", "_handle_bio_errors"): "the zero-copy flush reads pyOpenSSL's memory BIO itself (its _from_ssl, "
    "else bio_read) and reports a failed read as pyOpenSSL does",
    ("jobworker.tls", "_aborting"): "write_through reads FileDescriptor's state; a transport without it gets write",
    ("jobworker.tls", "_writeDisconnected"): "write_through reads FileDescriptor's state; a transport without it gets write",
    ("jobworker.tls", "_tempDataLen"): "write_through reads FileDescriptor's state; a transport without it gets write",
    ("jobworker.server.transport", "_dataReceived"): "the small-reads doRead calls tcp.Connection's own data path",
    ("jobworker.server.service", "_waitingForPort"): "StreamServerEndpointService keeps its listening Deferred there",
    ("jobworker.server.options", "_dispatch"): "usage.Options keeps its option handlers there (the config file feeds them)",
}


# -- reading the tree -------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported module (or one name imported from it)."""

    importer: str
    target: str  # the module, resolved: "from a import b" where a.b is a module gives "a.b"
    name: str | None  # the name imported from target ("from a import name"), else None
    line: int
    module_level: bool  # run when the importer is imported (not in a function)
    type_checking: bool  # under "if TYPE_CHECKING:"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    is_package: bool


def read_tree(root: Path) -> dict[str, Module]:
    """Every module under root/jobworker, parsed, by dotted name."""
    modules = {}
    for path in sorted((root / "jobworker").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        modules[name] = Module(name, path, ast.parse(path.read_text(), str(path)), is_package)
    return modules


def imports_of(module: Module, modules: dict[str, Module]) -> Iterator[Import]:
    """Every import statement of module, wherever it is."""

    def walk(node: ast.AST, module_level: bool, type_checking: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for statement in child.body:
                    yield from walk_one(statement, module_level, True)
                for statement in child.orelse:
                    yield from walk_one(statement, module_level, type_checking)
            else:
                yield from walk_one(child, module_level, type_checking)

    def walk_one(node: ast.AST, module_level: bool, type_checking: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module.name, alias.name, None, node.lineno, module_level, type_checking)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    yield Import(module.name, submodule, None, node.lineno, module_level, type_checking)
                else:
                    yield Import(module.name, source, alias.name, node.lineno, module_level, type_checking)
        else:
            inner = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(node, inner, type_checking)

    return walk(module.tree, True, False)


_imports_read: list[tuple[dict[str, Module], list[Import]]] = []


def all_imports(modules: dict[str, Module]) -> list[Import]:
    """Every import of every module (read once per tree: the checks share it)."""
    for tree, found in _imports_read:
        if tree is modules:
            return found
    found = [item for module in modules.values() for item in imports_of(module, modules)]
    _imports_read[:] = [(modules, found)]
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def tiers(layers: list[tuple[str, dict[str, str]]]) -> dict[str, tuple[int, str]]:
    """unit -> (its tier's index, its layer)."""
    return {unit: (index, layer) for index, (layer, units) in enumerate(layers) for unit in units}


def unit_of(name: str, table: dict[str, tuple[int, str]]) -> str | None:
    """The longest unit of the table that name is, or is inside of."""
    if name == "jobworker":
        return "jobworker" if "jobworker" in table else None
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        candidate = ".".join(parts[:end])
        if candidate in table:
            return candidate
    return None


# -- the checks, as functions over a tree ----------------------------------------------


def unplaced_modules(modules: dict[str, Module], layers: list[tuple[str, dict[str, str]]]) -> list[str]:
    table = tiers(layers)
    return sorted(name for name in modules if unit_of(name, table) is None)


def stale_units(modules: dict[str, Module], layers: list[tuple[str, dict[str, str]]]) -> list[str]:
    return sorted(unit for unit in tiers(layers) if unit not in modules)


def upward_imports(
    modules: dict[str, Module],
    layers: list[tuple[str, dict[str, str]]],
    allowed: dict[tuple[str, str], str],
) -> list[str]:
    """Imports between units that do not point to a lower tier."""
    table = tiers(layers)
    names: dict[tuple[str, int, str], list[str]] = {}
    for found in all_imports(modules):
        if top(found.target) != "jobworker":
            continue
        source, target = unit_of(found.importer, table), unit_of(found.target, table)
        if source is None or target is None or source == target:
            continue
        if table[target][0] < table[source][0] or (found.importer, found.target) in allowed:
            continue
        names.setdefault((found.importer, found.line, found.target), []).extend([found.name] if found.name else [])
    problems = []
    for (importer, line, imported), imported_names in names.items():
        source, target = unit_of(importer, table), unit_of(imported, table)
        assert source is not None and target is not None
        how = "a peer" if table[target][0] == table[source][0] else "above it"
        what = f" ({', '.join(sorted(imported_names))})" if imported_names else ""
        problems.append(
            f"{importer} (line {line}) imports {imported}{what}, {how} "
            f"({source}: {table[source][1]} tier {table[source][0]}; {target}: {table[target][1]} tier {table[target][0]})"
        )
    return sorted(problems)


def inner_upward_imports(modules: dict[str, Module], orders: dict[str, list[list[str]]]) -> list[str]:
    """Run-time imports inside one of the packages of orders that do not point to a lower tier."""
    problems = []
    for package, order in orders.items():
        tier = {f"{package}.{name}": index for index, names in enumerate(order) for name in names}
        unplaced = [name for name in modules if name.startswith(package + ".") and name not in tier]
        problems += [f"{name} is not in INNER_ORDER[{package!r}]" for name in unplaced]
        problems += [f"INNER_ORDER[{package!r}] names {name}, which is gone" for name in tier if name not in modules]
        for found in all_imports(modules):
            if found.importer not in tier or found.target not in tier or found.type_checking:
                continue
            if tier[found.target] >= tier[found.importer]:
                how = "a peer" if tier[found.target] == tier[found.importer] else "above it"
                problems.append(f"{found.importer} (line {found.line}) imports {found.target}, {how} in {package}")
    return sorted(set(problems))


def forbidden_imports(
    modules: dict[str, Module], layers: list[tuple[str, dict[str, str]]], layer: str, libraries: frozenset[str]
) -> list[str]:
    """Imports of any of libraries from a module of the given layer, wherever they are."""
    table = tiers(layers)
    return sorted(
        f"{found.importer} (line {found.line}) imports {found.target}"
        for found in all_imports(modules)
        if top(found.target) in libraries and table.get(unit_of(found.importer, table) or "", (0, ""))[1] == layer
    )


def impure_imports(
    modules: dict[str, Module], layers: list[tuple[str, dict[str, str]]], pure: Iterable[str]
) -> list[str]:
    """What the pure modules import that a pure module may not."""
    table = tiers(layers)
    pure = set(pure)
    problems = []
    for found in all_imports(modules):
        if found.importer not in pure:
            continue
        library = top(found.target)
        if library in TWISTED_WORLD or library in IO_MODULES:
            problems.append(f"{found.importer} (line {found.line}) imports {found.target}")
        elif library == "jobworker" and found.target not in pure:
            unit = unit_of(found.target, table)
            if unit is None or table[unit][1] != "core":
                problems.append(f"{found.importer} (line {found.line}) imports {found.target}, neither core nor pure")
    return sorted(problems)


def loaded_at_import(modules: dict[str, Module], start: str) -> dict[str, str]:
    """
    Every module that importing start loads (its module-level imports,
    transitively, with the packages above each), mapped to the module that
    imports it.  Modules outside jobworker are leaves: their names are what
    is reported.
    """
    imports: dict[str, list[Import]] = {}
    for found in all_imports(modules):
        imports.setdefault(found.importer, []).append(found)
    loaded: dict[str, str] = {}
    pending = [(start, "")]
    while pending:
        name, by = pending.pop()
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            above = ".".join(parts[:end])
            if above in loaded:
                continue
            loaded[above] = by
            if above in modules:
                for found in imports.get(above, []):
                    if found.module_level and not found.type_checking:
                        pending.append((found.target, above))
    return loaded


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_module_imports(modules: dict[str, Module], allowed: dict[tuple[str, str], str]) -> list[str]:
    """
    Imports of a private module (a part named _x) from outside the package
    that holds it, and of a private name from another module.
    """
    problems = []
    for found in all_imports(modules):
        parts = found.target.split(".")
        for index, part in enumerate(parts):
            if not private(part):
                continue
            package = ".".join(parts[:index])
            if top(found.target) == "jobworker":
                if not (found.importer == package or found.importer.startswith(package + ".")):
                    problems.append(f"{found.importer} (line {found.line}) imports {found.target}, private to {package}")
            elif (found.importer, part) not in allowed:
                problems.append(f"{found.importer} (line {found.line}) imports {found.target}, private to {package or part}")
            break
        if found.name is not None and private(found.name):
            if top(found.target) == "jobworker" or (found.importer, found.name) not in allowed:
                problems.append(f"{found.importer} (line {found.line}) imports {found.name}, private to {found.target}")
    return sorted(problems)


def defined_privates(module: Module, imported: bool = True) -> set[str]:
    """
    The private names a module defines: functions, classes, attributes,
    variables, arguments, keywords; with imported, also the names its
    imports bind.
    """
    names: set[str] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias) and imported:
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)  # argparse's set_defaults(_name=...), dataclass fields by keyword
    return {name for name in names if private(name)}


def private_attribute_uses(modules: dict[str, Module], allowed: dict[tuple[str, str], str]) -> list[str]:
    """
    Uses of something._name where _name is not defined in the module that
    uses it: defined in another jobworker module, it is a reach into that
    module's privates; defined nowhere in jobworker, it is another
    project's private and must be listed in allowed.
    """
    defined = {name: defined_privates(module) for name, module in modules.items()}
    owners: dict[str, set[str]] = {}
    for name, module in modules.items():
        for attribute in defined_privates(module, imported=False):
            owners.setdefault(attribute, set()).add(name)
    problems = []
    for name, module in modules.items():
        for node in ast.walk(module.tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            if node.attr in defined[name] or node.attr in ALWAYS_ALLOWED_PRIVATES:
                continue
            use = f"{ast.unparse(node.value)}.{node.attr}"
            others = sorted(owners.get(node.attr, set()) - {name})
            foreign = (name, node.attr) in allowed
            if others and not foreign:
                problems.append(f"{name} (line {node.lineno}) uses {use}, private to {', '.join(others)}")
            elif not others and not foreign:
                problems.append(f"{name} (line {node.lineno}) uses {use}, another project's private, not in FOREIGN_PRIVATES")
    return sorted(problems)


def unused(declared: Iterable[tuple[str, str]], modules: dict[str, Module]) -> list[tuple[str, str]]:
    """Declared (module, name) pairs whose name the module no longer mentions."""
    return sorted(
        (module, name) for module, name in declared
        if module not in modules or name not in modules[module].path.read_text()
    )


# -- the tests on the real tree -------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return read_tree(REPO)


def test_every_module_has_a_layer(modules: dict[str, Module]) -> None:
    assert unplaced_modules(modules, LAYERS) == [], "add the new module or package to LAYERS"
    assert stale_units(modules, LAYERS) == [], "LAYERS names a module that is gone"


def test_layers_are_in_order() -> None:
    seen = [layer for layer, _ in LAYERS]
    assert [layer for index, layer in enumerate(seen) if index == 0 or seen[index - 1] != layer] == list(LAYER_ORDER)


def test_imports_point_downwards(modules: dict[str, Module]) -> None:
    assert upward_imports(modules, LAYERS, UPWARD_IMPORTS) == []


def test_imports_inside_packages_point_downwards(modules: dict[str, Module]) -> None:
    assert inner_upward_imports(modules, INNER_ORDER) == []


def test_upward_exceptions_are_still_needed(modules: dict[str, Module]) -> None:
    needed = {
        (found.importer, found.target) for found in all_imports(modules)
        if (found.importer, found.target) in UPWARD_IMPORTS
    }
    assert set(UPWARD_IMPORTS) == needed


@pytest.mark.parametrize("layer", ["core", "host"])
def test_no_twisted_below_the_glue(modules: dict[str, Module], layer: str) -> None:
    """Nothing in the core (protocol/ included) or the host adapters imports Twisted, even lazily."""
    assert forbidden_imports(modules, LAYERS, layer, TWISTED_WORLD) == []


def test_the_core_does_no_io(modules: dict[str, Module]) -> None:
    assert forbidden_imports(modules, LAYERS, "core", IO_MODULES) == []


def test_the_helper_contract_imports_nothing(modules: dict[str, Module]) -> None:
    """Its place in the core rests on this: it is pure data, and the helper loads it bare."""
    found = {
        (item.target, item.name) for item in imports_of(modules["jobworker.host.contract"], modules)
        if not item.type_checking
    }
    assert found == {("__future__", "annotations")}


def test_pure_modules_above_the_core_stay_pure(modules: dict[str, Module]) -> None:
    assert set(PURE_MODULES) <= set(modules)
    assert impure_imports(modules, LAYERS, PURE_MODULES) == []


@pytest.mark.parametrize("front_end", LIGHT_FRONT_ENDS)
def test_light_front_ends_load_no_twisted(modules: dict[str, Module], front_end: str) -> None:
    loaded = loaded_at_import(modules, front_end)
    heavy = {name: by for name, by in loaded.items() if top(name) in HEAVY_AT_IMPORT}
    assert heavy == {}, f"importing {front_end} loads these (name: imported by)"
    assert "jobworker.protocol.wire" in loaded  # the closure is followed at all


def test_no_private_module_or_name_is_imported_across_modules(modules: dict[str, Module]) -> None:
    assert private_module_imports(modules, FOREIGN_PRIVATES) == []


def test_no_private_attribute_is_used_across_modules(modules: dict[str, Module]) -> None:
    assert private_attribute_uses(modules, FOREIGN_PRIVATES) == []


def test_foreign_privates_are_still_used(modules: dict[str, Module]) -> None:
    assert unused(FOREIGN_PRIVATES, modules) == []


def layer_map() -> str:
    """The Layer map section of CONTRIBUTING.md."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    return text[text.index("## Layer map"):text.index("\n## ", text.index("## Layer map") + 1)]


def test_the_layer_map_names_every_module(modules: dict[str, Module]) -> None:
    """CONTRIBUTING.md's Layer map has a line for each module (a package's line may name its modules)."""
    section = layer_map()
    missing = []
    for module in modules.values():
        relative = module.path.relative_to(REPO / "jobworker").as_posix()
        package = module.path.parent.relative_to(REPO / "jobworker").as_posix() + "/"
        if f"`{relative}`" in section:
            continue
        if module.is_package and (relative == "__init__.py" or f"`{package}" in section):
            continue
        if f"`{package}" in section and f"`{module.path.name}`" in section:
            continue
        missing.append(relative)
    assert missing == []


def test_the_layer_map_names_no_missing_file() -> None:
    named = re.findall(r"`([\w/]+(?:\.py|/))`", layer_map())
    files = [path.relative_to(REPO).as_posix() for path in REPO.glob("jobworker/**/*.py")]
    files += [path.relative_to(REPO).as_posix() + "/" for path in REPO.glob("jobworker/**/") if path != REPO / "jobworker"]
    outside = [name for name in named if (REPO / name).exists()]  # twisted/plugins/..., tests/ and the like
    gone = [name for name in named if name not in outside and not any(f.endswith("/" + name) for f in files)]
    assert gone == []
    assert len(named) > 40  # the pattern finds the map's entries at all


# -- the checkers fail on a bad tree ------------------------------------------------------


SMALL_LAYERS: list[tuple[str, dict[str, str]]] = [
    ("core", {"jobworker": "", "jobworker.protocol": ""}),
    ("host", {"jobworker.host": ""}),
    ("glue", {"jobworker.server": ""}),
    ("front", {"jobworker.cli": "", "jobworker.client": ""}),
]


def small_tree(root: Path, files: dict[str, str]) -> dict[str, Module]:
    base = {
        "jobworker/__init__.py": "",
        "jobworker/protocol/__init__.py": "",
        "jobworker/protocol/wire.py": "import struct\n",
        "jobworker/host/__init__.py": "",
        "jobworker/host/cgroups/__init__.py": "from jobworker.host.cgroups._host import HostCalls\n",
        "jobworker/host/cgroups/_host.py": "class HostCalls:\n    pass\n",
        "jobworker/host/cgroups/v1.py": "from jobworker.host.cgroups._host import HostCalls\n",
        "jobworker/server.py": "from twisted.internet import reactor\nfrom jobworker.protocol import wire\n",
        "jobworker/client.py": "from jobworker.protocol import wire\n",
        "jobworker/cli.py": "from jobworker.protocol import wire\n\ndef main():\n    from jobworker import server\n",
    }
    for name, text in (base | files).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_tree(root)


def test_a_good_small_tree_passes(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {})
    assert unplaced_modules(modules, SMALL_LAYERS) == []
    assert upward_imports(modules, SMALL_LAYERS, {}) == []  # cli's lazy import of server points down
    assert forbidden_imports(modules, SMALL_LAYERS, "core", TWISTED_WORLD) == []
    assert private_module_imports(modules, {}) == []
    assert private_attribute_uses(modules, {}) == []
    assert "twisted" not in loaded_at_import(modules, "jobworker.cli")  # server is imported lazily


def test_an_upward_import_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {"jobworker/protocol/messages.py": "from jobworker.host import cgroups\n"})
    assert upward_imports(modules, SMALL_LAYERS, {}) == [
        "jobworker.protocol.messages (line 1) imports jobworker.host.cgroups, above it "
        "(jobworker.protocol: core tier 0; jobworker.host: host tier 1)"
    ]
    allowed = {("jobworker.protocol.messages", "jobworker.host.cgroups"): "a reason"}
    assert upward_imports(modules, SMALL_LAYERS, allowed) == []


def test_a_sideways_import_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {"jobworker/client.py": "def f():\n    from jobworker.cli import main\n"})
    assert upward_imports(modules, SMALL_LAYERS, {}) == [
        "jobworker.client (line 2) imports jobworker.cli (main), a peer "
        "(jobworker.client: front tier 3; jobworker.cli: front tier 3)"
    ]


def test_an_upward_import_inside_a_package_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {
        "jobworker/protocol/wire.py": "from jobworker.protocol import connection\n",
        "jobworker/protocol/connection.py": "from jobworker.protocol import wire\n",
        "jobworker/protocol/flow.py": "if TYPE_CHECKING:\n    from jobworker.protocol.connection import Connection\n",
        "jobworker/protocol/keepalive.py": "",
    })
    order = {"jobworker.protocol": [["wire", "flow"], ["connection"]]}
    assert inner_upward_imports(modules, order) == [
        "jobworker.protocol.keepalive is not in INNER_ORDER['jobworker.protocol']",
        "jobworker.protocol.wire (line 1) imports jobworker.protocol.connection, above it in jobworker.protocol",
    ]


def test_twisted_in_the_core_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {
        "jobworker/protocol/wire.py": "def f():\n    from twisted.internet import defer\n",
        "jobworker/host/uids.py": "if TYPE_CHECKING:\n    import zope.interface\n",
    })
    assert forbidden_imports(modules, SMALL_LAYERS, "core", TWISTED_WORLD) == [
        "jobworker.protocol.wire (line 2) imports twisted.internet"
    ]
    assert forbidden_imports(modules, SMALL_LAYERS, "host", TWISTED_WORLD) == [
        "jobworker.host.uids (line 2) imports zope.interface"
    ]


def test_an_impure_import_of_a_pure_module_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {
        "jobworker/host/cgroups/_procfs.py": "import re\nfrom jobworker.protocol import wire\n",
        "jobworker/server/__init__.py": "",
        "jobworker/server/spec.py": "import os\nfrom jobworker.host.cgroups import _procfs\nfrom jobworker.host import cgroups\n",
    })
    (tmp_path / "jobworker/server.py").unlink()
    modules = read_tree(tmp_path)
    pure = ["jobworker.server.spec", "jobworker.host.cgroups._procfs"]
    assert impure_imports(modules, SMALL_LAYERS, pure) == [
        "jobworker.server.spec (line 1) imports os",
        "jobworker.server.spec (line 3) imports jobworker.host.cgroups, neither core nor pure",
    ]


def test_twisted_loaded_by_jobcli_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {"jobworker/cli.py": "from jobworker.protocol import wire\n",
                                    "jobworker/protocol/wire.py": "from jobworker import server\n"})
    loaded = loaded_at_import(modules, "jobworker.cli")
    assert loaded["twisted.internet"] == "jobworker.server"
    assert loaded["jobworker.server"] == "jobworker.protocol.wire"


def test_a_private_module_from_outside_its_package_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {"jobworker/server.py": "from jobworker.host.cgroups._host import HostCalls\n"})
    assert private_module_imports(modules, {}) == [
        "jobworker.server (line 1) imports jobworker.host.cgroups._host, private to jobworker.host.cgroups"
    ]


def test_a_private_name_from_another_module_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {
        "jobworker/protocol/wire.py": "_LIMIT = 3\n\nclass Codec:\n    def _encode(self):\n        pass\n",
        "jobworker/client.py": "from jobworker.protocol.wire import _LIMIT\n",
        "jobworker/server.py": "from jobworker.protocol import wire\n"
                               "x = wire._LIMIT\n\ndef send(codec):\n    codec._encode()\n",
    })
    assert private_module_imports(modules, {}) == [
        "jobworker.client (line 1) imports _LIMIT, private to jobworker.protocol.wire"
    ]
    assert private_attribute_uses(modules, {}) == [
        "jobworker.server (line 2) uses wire._LIMIT, private to jobworker.protocol.wire",
        "jobworker.server (line 5) uses codec._encode, private to jobworker.protocol.wire",
    ]


def test_an_undeclared_foreign_private_fails(tmp_path: Path) -> None:
    modules = small_tree(tmp_path, {"jobworker/server.py": "def f(transport):\n    return transport._tempDataLen\n"})
    assert private_attribute_uses(modules, {}) == [
        "jobworker.server (line 2) uses transport._tempDataLen, another project's private, not in FOREIGN_PRIVATES"
    ]
    assert private_attribute_uses(modules, {("jobworker.server", "_tempDataLen"): "a reason"}) == []
