"""
The client config file (L{jobworker.clientside.config}): where it is looked for,
what it may hold, and the order in which flags, the environment and the
file choose a server and its credentials.  Pure: no server, no reactor.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, strategies as st

from jobworker.clientside.config import (
    MAX_TARGETS,
    ClientConfig,
    ClientConfigError,
    config_path,
    load_client_config,
    resolve_targets,
)


def test_where_the_file_is_looked_for():
    assert config_path({"HOME": "/home/a"}) == "/home/a/.config/jobworker/config.toml"
    assert config_path({"HOME": "/home/a", "XDG_CONFIG_HOME": "/x"}) == "/x/jobworker/config.toml"
    # The XDG spec: a relative XDG_CONFIG_HOME is invalid and ignored.
    assert config_path({"HOME": "/home/a", "XDG_CONFIG_HOME": "rel"}) == "/home/a/.config/jobworker/config.toml"
    assert config_path({"HOME": "/home/a", "JOBWORKER_CONFIG": "/etc/j.toml"}) == "/etc/j.toml"


def test_a_missing_file_is_an_empty_config(tmp_path):
    assert load_client_config(tmp_path / "none.toml") == ClientConfig()


def test_paths_are_relative_to_the_file_and_tilde_is_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    path = tmp_path / "sub" / "config.toml"
    path.parent.mkdir()
    path.write_text('[defaults]\nca = "pki/ca.pem"\n[servers.a]\naddress = "h:1"\ncert = "~/a.pem"\nkey = "/abs/a.key"\n')
    config = load_client_config(path)
    assert config.defaults == {"ca": str(tmp_path / "sub" / "pki" / "ca.pem")}
    entry = config.servers["a"]
    assert (entry.address, entry.ca, entry.cert, entry.key) == ("h:1", None, "/home/someone/a.pem", "/abs/a.key")


def config_with_servers() -> ClientConfig:
    from jobworker.clientside.config import ServerEntry

    return ClientConfig(
        path="/c.toml",
        default="a",
        defaults={"ca": "/d/ca.pem"},
        servers={"a": ServerEntry("a", "a.example:1", cert="/a/cert.pem"), "b": ServerEntry("b", "b.example:2")},
    )


def test_the_order_flag_env_file_default():
    config = config_with_servers()
    [target] = resolve_targets(config, environ={})
    assert (target.name, target.address.value, target.configured) == ("a", "a.example:1", True)
    assert target.address.source == "server a in /c.toml (chosen by default in /c.toml)"
    assert (target.ca.value, target.ca.source) == ("/d/ca.pem", "[defaults] in /c.toml")
    assert (target.cert.value, target.cert.source) == ("/a/cert.pem", "server a in /c.toml")
    assert target.key.value == "certs/admin.key" and target.key.source.startswith("built-in default")
    [by_env] = resolve_targets(config, environ={"JOBWORKER_SERVER": "b", "JOBWORKER_CERT": "/e/cert.pem"})
    assert by_env.name == "b" and by_env.address.value == "b.example:2"
    assert (by_env.cert.value, by_env.cert.source) == ("/e/cert.pem", "$JOBWORKER_CERT")
    [by_flag] = resolve_targets(config, server="h:9", cert="/f.pem", environ={"JOBWORKER_SERVER": "b", "JOBWORKER_CERT": "/e.pem"})
    assert (by_flag.name, by_flag.address.value, by_flag.address.source, by_flag.configured) == ("h:9", "h:9", "--server", False)
    assert (by_flag.cert.value, by_flag.cert.source) == ("/f.pem", "--cert")
    [bare] = resolve_targets(ClientConfig(), environ={})
    assert (bare.address.value, bare.ca.value, bare.cert.value) == ("localhost:8443", "certs/ca.pem", "certs/admin.pem")


def test_a_list_names_several_servers_once_each():
    targets = resolve_targets(config_with_servers(), server="b, a,b,10.0.0.1:3", environ={})
    assert [target.name for target in targets] == ["b", "a", "10.0.0.1:3"]
    with pytest.raises(ClientConfigError, match="an empty server name"):
        resolve_targets(ClientConfig(), server="a,,b", environ={})
    with pytest.raises(ClientConfigError, match=f"at most {MAX_TARGETS}"):
        resolve_targets(ClientConfig(), server=",".join(f"h{i}" for i in range(MAX_TARGETS + 1)), environ={})


@given(st.text(max_size=200))
def test_any_text_is_a_config_or_one_clear_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        config = load_client_config(path)
    except ClientConfigError as exc:
        assert str(exc).startswith(str(path)) or str(exc).startswith(f"cannot read {path}")
        assert "\n" not in str(exc)
        return
    for entry in config.servers.values():
        assert entry.address and "," not in entry.name
    if config.default is not None:
        assert config.default in config.servers


def test_a_file_that_cannot_be_read_names_itself(tmp_path):
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    with pytest.raises(ClientConfigError, match=f"cannot read {directory}"):
        load_client_config(directory)
    assert os.path.isdir(directory)
