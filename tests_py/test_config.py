"""Settings from flags, SOCKETCOMM_* variables and a TOML file, in that order of precedence."""

from __future__ import annotations

import sys
from pathlib import Path

import socketcomm

from conftest import ServerProcess, run


def print_config(*args: str, **env: str) -> dict[str, tuple[str, str]]:
    """`server.py --print-config`: {name: (value, source)} for the settings that are set."""
    result = run([sys.executable, "server.py", "--print-config", *args], **env)
    assert result.returncode == 0, result.stderr
    settings = {}
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            continue
        assignment, source = line.split("  # ")
        name, value = assignment.split(" = ")
        settings[name] = (value, source)
    return settings


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('port = 1111\n\n[server]\nmode = "echo"\nmax_connections = 7\n')
    with_all = print_config("--config", str(config), "--port", "3333", SOCKETCOMM_PORT="2222")
    assert with_all["port"] == ("3333", "flag --port")
    assert with_all["mode"] == ('"echo"', f"config file {config}")
    assert with_all["max_connections"] == ("7", f"config file {config}")
    assert with_all["host"] == ('"127.0.0.1"', "default")

    no_flag = print_config("--config", str(config), SOCKETCOMM_PORT="2222")
    assert no_flag["port"] == ("2222", "environment $SOCKETCOMM_PORT")

    file_only = print_config(SOCKETCOMM_CONFIG=str(config))
    assert file_only["port"] == ("1111", f"config file {config}")

    defaults = print_config()
    assert defaults["port"] == (str(socketcomm.DEFAULT_PORT), "default")


def test_the_client_table_does_not_leak_into_the_server(tmp_path: Path) -> None:
    config = tmp_path / "both.toml"
    config.write_text("[client]\ntimeout = 3.5\nport = 5000\n[server]\nport = 6000\n")
    assert print_config("--config", str(config))["port"][0] == "6000"
    result = run([sys.executable, "client.py", "--config", str(config), "--print-config"])
    assert "timeout = 3.5  # config file" in result.stdout
    assert "port = 5000  # config file" in result.stdout


def test_bad_settings_are_refused_naming_them(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    result = run([sys.executable, "server.py", "--config", str(unknown)])
    assert result.returncode == 2
    assert "unknown setting 'colour'" in result.stderr

    bad_value = tmp_path / "bad.toml"
    bad_value.write_text("[server]\nmax_connections = 0\n")
    result = run([sys.executable, "server.py", "--config", str(bad_value)])
    assert result.returncode == 2
    assert f"max_connections in {bad_value}: 0 must be at least 1" in result.stderr

    result = run([sys.executable, "server.py"], SOCKETCOMM_IDLE_TIMEOUT="soon")
    assert result.returncode == 2
    assert "$SOCKETCOMM_IDLE_TIMEOUT: 'soon' is not a number" in result.stderr

    missing = run([sys.executable, "server.py", "--config", str(tmp_path / "nope.toml")])
    assert missing.returncode == 2
    assert "cannot read the config file" in missing.stderr

    not_toml = tmp_path / "broken.toml"
    not_toml.write_text("port = = 3\n")
    assert (
        "is not valid TOML" in run([sys.executable, "server.py", "--config", str(not_toml)]).stderr
    )


def test_a_server_runs_with_the_settings_of_its_file(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\nmode = "ack"\nreply = "from the file"\n')
    process = ServerProcess("--config", str(config))
    try:
        with socketcomm.Client(process.host, process.port, timeout=5) as client:
            assert client.request("?") == b"from the file"
    finally:
        process.stop()


def test_log_levels_from_flags(tmp_path: Path) -> None:
    process = ServerProcess("-v")
    try:
        with socketcomm.Client(process.host, process.port, timeout=5) as client:
            client.request("hi")
        process.wait_for_line("stdout", "ended!")
    finally:
        _, _, err = process.stop()
    assert "INFO socketcomm.cli: connection 1 from" in err
    assert "ended: closed by the client" in err
    assert "hi" not in err.replace("this", ""), "payloads are never logged"
