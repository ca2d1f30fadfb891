"""
The configuration file (issue 14, item 2): every option of C{twistd
jobworker} is a TOML key, read through the option's own checks; the
command line wins; an unknown key or a bad value is one line naming it.

These tests parse options only (no server, no reactor).  They are written
over the Options class itself, so options added later are covered too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from jobworker.server.service import CONFIG_PATH, Options, StartupError
from tests.support import REPO

EXAMPLE = REPO / "contrib" / "jobworker.toml"


def _parameters() -> list[str]:
    return [name[:-1] for name in Options().longOpt if name.endswith("=") and name[:-1] != "config"]


def _flags() -> list[str]:
    return [name for name in Options().longOpt if not name.endswith("=") and name not in ("help", "version")]


def _defaults() -> dict[str, object]:
    options = Options()
    return {name: options.defaults.get(name) for name in _parameters()}


def _toml_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_text(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse(tmp_path: Path, config: str | None, argv: Sequence[str] = ()) -> Options:
    options = Options()
    arguments = list(argv)
    if config is not None:
        path = tmp_path / "jobworker.toml"
        path.write_text(config)
        arguments = ["--config", str(path), *arguments]
    # A state dir of our own, so that parsing never chooses /var/lib.
    if "--state-dir" not in arguments and (config is None or "state-dir" not in config):
        arguments += ["--state-dir", str(tmp_path / "state")]
    options.parseOptions(arguments)
    return options


def _settings(options: Options) -> dict[str, object]:
    return {key: value for key, value in options.items() if key != "config"}


# A value each option takes, for the options without a default: the
# command line and the file must agree on it whatever it is.
_SAMPLE = "1"


@pytest.mark.parametrize("name", _parameters())
def test_every_option_is_a_key_with_the_command_lines_meaning(name, tmp_path):
    """
    C{name = V} in the file means exactly C{--name V} on the command line:
    the same parsed settings, or the same refusal naming the option.
    """
    default = _defaults()[name]
    value = _SAMPLE if default in (None, "") else str(default)
    try:
        by_command_line = _settings(_parse(tmp_path, None, [f"--{name}", value]))
    except Exception as exc:
        with pytest.raises(StartupError) as refused:
            _parse(tmp_path, f"{name} = {_toml_text(value)}\n")
        assert f"key {name!r}" in str(refused.value), (exc, refused.value)
        return
    by_file = _settings(_parse(tmp_path, f"{name} = {_toml_text(value)}\n"))
    assert by_file == by_command_line


@pytest.mark.parametrize("name", _flags())
def test_every_flag_is_a_boolean_key(name, tmp_path):
    assert _settings(_parse(tmp_path, f"{name} = true\n")) == _settings(_parse(tmp_path, None, [f"--{name}"]))
    assert _settings(_parse(tmp_path, f"{name} = false\n")) == _settings(_parse(tmp_path, None, []))
    with pytest.raises(StartupError, match=re.escape(f"key {name!r}")):
        _parse(tmp_path, f'{name} = "yes"\n')


def test_numbers_may_be_written_as_toml_numbers(tmp_path):
    options = _parse(tmp_path, "grace = 2.5\nmax-finished-jobs = 7\ndefault-pids = 64\n")
    assert options["grace"] == 2.5
    assert options["max-finished-jobs"] == 7
    assert options["default-limits"].pids == 64


def test_the_command_line_wins(tmp_path):
    options = _parse(tmp_path, 'grace = "5"\nlisten = ["tcp:1", "tcp:2"]\n', ["--grace", "7", "--listen", "tcp:3"])
    assert options["grace"] == 7.0
    # A repeatable option's values on the command line replace the file's.
    assert options["listen"] == ["tcp:3"]


def test_listen_is_repeatable_in_both(tmp_path):
    assert _parse(tmp_path, 'listen = ["tcp:1", "unix:/tmp/x.sock"]\n')["listen"] == ["tcp:1", "unix:/tmp/x.sock"]
    assert _parse(tmp_path, 'listen = "tcp:1"\n')["listen"] == ["tcp:1"]
    assert _parse(tmp_path, None, ["--listen", "tcp:1", "-l", "tcp:2"])["listen"] == ["tcp:1", "tcp:2"]
    assert _parse(tmp_path, None, [])["listen"] == ["tcp:8443"]


@pytest.mark.parametrize(
    "text, key",
    [
        ('no-such-option = "1"\n', "no-such-option"),
        ('state_dir = "/x"\n', "state_dir"),  # the keys are spelt as the options
        ('config = "/other.toml"\n', "config"),
        ('[limits]\nmemory = "1G"\n', "limits"),
    ],
)
def test_an_unknown_key_is_one_line_naming_it(text, key, tmp_path):
    with pytest.raises(StartupError) as refused:
        _parse(tmp_path, text)
    message = str(refused.value)
    assert "\n" not in message
    assert f"unknown key {key!r}" in message


@pytest.mark.parametrize(
    "text, key",
    [
        ('retention = "lots"\n', "retention"),
        ('default-memory = "12Q"\n', "default-memory"),
        ('max-cpu = "fast"\n', "max-cpu"),
        ('grace = "soon"\n', "grace"),
        ('cgroups = "v3"\n', "cgroups"),
        ("grace = true\n", "grace"),
        ("listen = [1, 2]\n", "listen"),
        ('log-format = "xml"\n', "log-format"),
        ("ca = { path = \"x\" }\n", "ca"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(text, key, tmp_path):
    with pytest.raises(StartupError) as refused:
        _parse(tmp_path, text)
    message = str(refused.value)
    assert "\n" not in message
    assert f"key {key!r}" in message, message


def test_bad_toml_and_a_missing_file(tmp_path):
    with pytest.raises(StartupError, match="not valid TOML"):
        _parse(tmp_path, "grace = \n")
    with pytest.raises(StartupError, match="cannot read it: No such file"):
        Options().parseOptions(["--config", str(tmp_path / "absent.toml")])


def test_default_path_is_the_documented_one():
    assert CONFIG_PATH == "/etc/jobworker/jobworker.toml"
    assert CONFIG_PATH in (REPO / "README.md").read_text()
    assert CONFIG_PATH in Options().__str__()  # --help says so


def _example_settings() -> dict[str, object]:
    """
    The example config with every commented-out setting switched on.
    """
    import tomllib

    lines, seen = [], set()
    for line in EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#\s?(([a-z][a-z0-9-]*) = .*)", line)
        if match and match.group(2) not in seen:  # the first of several examples
            seen.add(match.group(2))
            lines.append(match.group(1))
    return tomllib.loads("\n".join(lines))


def test_the_example_config_names_every_option_and_is_valid(tmp_path):
    settings = _example_settings()
    missing = sorted((set(_parameters()) | set(_flags())) - set(settings))
    assert not missing, f"contrib/jobworker.toml does not describe {missing}"
    # As shipped (every line commented), it is a valid, empty config.
    assert _parse(tmp_path, EXAMPLE.read_text())["config"]
    # Each setting it shows parses (the values are the defaults or examples).
    for key, value in settings.items():
        if key in ("state-dir", "cgroup-prefix", "ca", "cert", "key"):
            continue  # paths of this host, checked when the server starts
        _parse(tmp_path, f"{key} = {_toml_text(value)}\n")
