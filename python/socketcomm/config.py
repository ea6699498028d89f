"""Settings of the command line, from four sources in one order of precedence:

    command-line flag  >  SOCKETCOMM_<NAME> environment variable  >  --config FILE  >  default

The file is TOML. Top-level keys apply to both commands; a ``[server]`` or ``[client]`` table
applies to that command only and wins over the top level:

    port = 7000

    [server]
    mode = "echo"
    max_connections = 500
    keepalive = 30

Every setting has the same name as the keyword option of `socketcomm.Server`/`Client`, the
flag (``max_connections`` is ``--max-connections``) and the variable
(``SOCKETCOMM_MAX_CONNECTIONS``). ``--print-config`` shows the effective settings and where
each came from.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socketcomm._socketcomm import (
    ACK_REPLY,
    DEFAULT_HOST,
    DEFAULT_INBOUND_BYTES,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_FRAME,
    DEFAULT_OUTBOUND_BYTES,
    DEFAULT_PORT,
)

ENV_PREFIX = "SOCKETCOMM_"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting's value is unusable; the message names the setting and its source."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a port number (0 to 65535)")
    return port


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _non_negative_integer(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError(f"{value} must be 0 or more")
    return value


def _positive_integer(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise ValueError(f"{text} must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise ValueError(f"{text} must not be negative")
    return value


def _address(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), _port(port)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _text(text: str) -> str:
    return text


@dataclass(frozen=True)
class Setting:
    """One setting: its name everywhere, how to read it from text, its default and help."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    boolean: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _common(role: str) -> list[Setting]:
    verb = "listen on" if role == "server" else "connect to"
    return [
        Setting("host", _text, DEFAULT_HOST, f"address to {verb}", "HOST"),
        Setting("port", _port, DEFAULT_PORT, f"TCP port to {verb}", "PORT"),
    ]


_SOCKET = [
    Setting("nodelay", _boolean, True, "TCP_NODELAY: send small messages at once", boolean=True),
    Setting(
        "keepalive",
        _positive_float,
        None,
        "send TCP keepalive probes after this long idle (seconds)",
        "SECONDS",
    ),
    Setting(
        "keepalive_interval",
        _positive_float,
        None,
        "seconds between keepalive probes",
        "SECONDS",
    ),
    Setting(
        "keepalive_count",
        _positive_integer,
        None,
        "unanswered keepalive probes before the connection is dropped",
        "N",
    ),
    Setting("recv_buffer", _positive_integer, None, "SO_RCVBUF in bytes", "BYTES"),
    Setting("send_buffer", _positive_integer, None, "SO_SNDBUF in bytes", "BYTES"),
    Setting(
        "linger",
        _non_negative_float,
        None,
        "SO_LINGER: seconds close() may wait for unsent data (0 resets)",
        "SECONDS",
    ),
]

SOCKET_OPTION_NAMES = [setting.name for setting in _SOCKET]

# Heartbeats, on both commands; 0 turns one off (the library takes None for that).
_HEARTBEAT = [
    Setting(
        "ping_interval",
        _non_negative_float,
        20.0,
        "ping the peer this often, to notice one that vanished (seconds; 0: no pings)",
        "SECONDS",
    ),
    Setting(
        "ping_timeout",
        _non_negative_float,
        20.0,
        "close the connection when nothing arrives for this long after a ping (seconds; 0: never)",
        "SECONDS",
    ),
]
HEARTBEAT_NAMES = [setting.name for setting in _HEARTBEAT]

_TLS_VERSION = Setting(
    "tls_min_version",
    _choice(("1.2", "1.3")),
    "1.3",
    "the lowest TLS version accepted",
    "VERSION",
)

_SERVER_TLS = [
    Setting("tls_cert", _text, None, "serve TLS with this certificate chain (PEM)", "FILE"),
    Setting("tls_key", _text, None, "the private key of --tls-cert (PEM)", "FILE"),
    Setting(
        "tls_self_signed",
        _boolean,
        False,
        "serve TLS with a certificate made at start-up; its fingerprint is printed for clients "
        "to pin with --tls-fingerprint (development only)",
        boolean=True,
    ),
    Setting(
        "tls_client_ca",
        _text,
        None,
        "require client certificates signed by this CA (PEM): mutual TLS",
        "FILE",
    ),
    _TLS_VERSION,
]

_CLIENT_TLS = [
    Setting(
        "tls",
        _boolean,
        False,
        "connect with TLS, trusting the system's root certificates",
        boolean=True,
    ),
    Setting("tls_ca", _text, None, "connect with TLS, trusting this CA (PEM)", "FILE"),
    Setting(
        "tls_fingerprint",
        _text,
        None,
        "connect with TLS, trusting exactly the certificate with this SHA-256 fingerprint",
        "sha256:HEX",
    ),
    Setting("tls_client_cert", _text, None, "present this certificate (PEM) to the server", "FILE"),
    Setting("tls_client_key", _text, None, "the private key of --tls-client-cert", "FILE"),
    Setting(
        "tls_server_name",
        _text,
        None,
        "the name the server's certificate must be valid for (default: --host)",
        "NAME",
    ),
    _TLS_VERSION,
]

_LOGGING = [
    Setting("log_level", _choice(LOG_LEVELS), "warning", "how much to log", "LEVEL"),
]

SERVER_SETTINGS = [
    *_common("server"),
    Setting(
        "mode",
        _choice(("reply", "echo", "ack", "broadcast")),
        "reply",
        "how messages are answered (see the modes below)",
        "MODE",
    ),
    Setting("reply", _text, ACK_REPLY.decode(), "the answer of the reply and ack modes", "TEXT"),
    Setting(
        "backplane",
        _text,
        None,
        "share rooms and broadcasts with the other servers using this Redis "
        "(redis://HOST:PORT/DB): clients of any of them are in the same rooms",
        "URL",
    ),
    Setting(
        "keep_open",
        _boolean,
        False,
        "reply mode: keep a plain-socket client connected after the reply and answer all it "
        "sends (an interactive session, e.g. with netcat); by default it gets the original's "
        "exchange: one message, the reply, the close",
        boolean=True,
    ),
    Setting(
        "max_frame", _positive_integer, DEFAULT_MAX_FRAME, "largest frame from a client", "BYTES"
    ),
    Setting(
        "inbound_bytes",
        _positive_integer,
        DEFAULT_INBOUND_BYTES,
        "bytes of one client's messages that may wait for the server's code; then its "
        "socket is not read until they are taken",
        "BYTES",
    ),
    Setting(
        "outbound_bytes",
        _positive_integer,
        DEFAULT_OUTBOUND_BYTES,
        "bytes of messages that may wait to be written to one client",
        "BYTES",
    ),
    Setting(
        "max_buffered",
        _positive_integer,
        None,
        "bytes the server holds for all its clients together (default: a quarter of the "
        "memory, shared among the --workers)",
        "BYTES",
    ),
    Setting(
        "max_connections",
        _positive_integer,
        10_000,
        "clients served at once; one more is told the server is full",
        "N",
    ),
    Setting(
        "idle_timeout",
        _positive_float,
        None,
        "close a connection that completes no message for this long (seconds)",
        "SECONDS",
    ),
    Setting(
        "raw_min_rate",
        _non_negative_integer,
        0,
        "with --idle-timeout, a plain-socket client must send this many bytes per second for "
        "its messages to count as activity (0: any message counts)",
        "BYTES",
    ),
    Setting(
        "reuse_addr",
        _boolean,
        True,
        "SO_REUSEADDR: restart at once while old connections sit in TIME_WAIT",
        boolean=True,
    ),
    Setting(
        "reuse_port",
        _boolean,
        False,
        "let several servers share the port (SO_REUSEPORT)",
        boolean=True,
    ),
    Setting(
        "upload_dir",
        _text,
        None,
        "receive files from clients into this folder (off unless set)",
        "DIR",
    ),
    Setting(
        "max_file_size",
        _positive_integer,
        DEFAULT_MAX_FILE_SIZE,
        "largest file accepted into --upload-dir",
        "BYTES",
    ),
    Setting(
        "max_partial_bytes",
        _positive_integer,
        None,
        "bytes that interrupted uploads kept for a resume may hold in --upload-dir, the "
        "oldest going first (default: a quarter of its file system)",
        "BYTES",
    ),
    *_SERVER_TLS,
    Setting("backlog", _positive_integer, 1024, "the listen backlog", "N"),
    Setting(
        "workers",
        _positive_integer,
        1,
        "serve the port from this many processes (SO_REUSEPORT spreads the connections); "
        "in the native modes, this many listeners in one process, one broadcast room",
        "N",
    ),
    *_SOCKET,
    *_HEARTBEAT,
    *_LOGGING,
]

CLIENT_SETTINGS = [
    *_common("client"),
    Setting(
        "raw",
        _boolean,
        False,
        "plain TCP with no framing, for servers that are not socketcomm servers",
        boolean=True,
    ),
    Setting(
        "timeout",
        _positive_float,
        10.0,
        "how long to wait for the connection and the answer (seconds)",
        "SECONDS",
    ),
    Setting(
        "local_address",
        _address,
        None,
        "the local HOST:PORT to connect from",
        "HOST:PORT",
    ),
    Setting(
        "retries",
        _non_negative_integer,
        0,
        "try again this many times when the server cannot be reached, with backoff",
        "N",
    ),
    Setting(
        "backoff",
        _positive_float,
        0.2,
        "seconds before the first retry; doubled after each (at most 5)",
        "SECONDS",
    ),
    Setting(
        "room",
        _text,
        None,
        "with -i: join this room at start (a topic such as lobby or chat.lobby); the lines "
        "typed go to it; /join, /leave and /rooms change rooms (the server in --mode "
        "broadcast relays each room)",
        "ROOM",
    ),
    *_CLIENT_TLS,
    *_SOCKET,
    *_HEARTBEAT,
    *_LOGGING,
]


def add_arguments(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """Adds a flag per setting (default None, so that the other sources can be told apart),
    plus ``--config`` and ``--print-config``."""
    for setting in settings:
        default = "" if setting.default is None else f" (default: {setting.default!r})"
        help_text = f"{setting.help}{default}; also ${setting.env}".replace("%", "%%")
        if setting.boolean:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                type=_argparse_type(setting),
                default=None,
                metavar=setting.metavar,
                help=help_text,
            )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=None,
        help=f"a TOML file of settings (also ${ENV_PREFIX}CONFIG); flags and variables win",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings and where each came from, then exit",
    )


def _argparse_type(setting: Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return setting.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = setting.name
    return parse


@dataclass
class Resolved:
    """The effective settings, and the source of each."""

    values: dict[str, Any]
    sources: dict[str, str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def render(self, role: str) -> str:
        """The settings as TOML, each with its source in a comment."""
        lines = [
            f"# effective settings of `socketcomm {role}`",
            "# (flag > environment variable > config file > default)",
        ]
        for name, value in self.values.items():
            source = self.sources[name]
            if value is None:
                lines.append(f"# {name} is not set  # {source}")
            else:
                lines.append(f"{name} = {_toml(value)}  # {source}")
        return "\n".join(lines)

    def as_flags(self, settings: Sequence[Setting]) -> list[str]:
        """The command-line flags that reproduce these settings (for worker processes)."""
        flags: list[str] = []
        for setting in settings:
            value = self.values[setting.name]
            if value is None:
                continue
            if setting.boolean:
                flags.append(setting.flag if value else "--no-" + setting.flag[2:])
            elif isinstance(value, tuple):
                flags += [setting.flag, f"{value[0]}:{value[1]}"]
            else:
                flags += [setting.flag, str(value)]
        return flags


def _toml(value: Any) -> str:
    if isinstance(value, tuple):
        host, port = value
        return f'"{host}:{port}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def load_file(path: Path, role: str, settings: Sequence[Setting]) -> dict[str, Any]:
    """The settings a TOML file gives `role`: its top level, then its ``[role]`` table."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    known = {setting.name for setting in settings}
    others = {"server", "client"} - {role}
    merged: dict[str, Any] = {}
    for scope, table in (("", data), (f"[{role}] ", data.get(role, {}))):
        if not isinstance(table, Mapping):
            raise ConfigError(f"{path}: [{role}] must be a table")
        for key, value in table.items():
            if key in ("server", "client") and scope == "":
                continue
            if key not in known and key not in others:
                raise ConfigError(
                    f"{path}: unknown setting {scope}{key!r} for `socketcomm {role}`; known: "
                    + ", ".join(sorted(known))
                )
            if key in known:
                merged[key] = value
    return merged


def resolve(args: argparse.Namespace, settings: Sequence[Setting], role: str) -> Resolved:
    """Each setting from the first source that has it: flag, environment, file, default.

    Raises ConfigError naming the setting and the source of an unusable value.
    """
    config_path = args.config
    if config_path is None and os.environ.get(ENV_PREFIX + "CONFIG"):
        config_path = Path(os.environ[ENV_PREFIX + "CONFIG"])
    from_file = load_file(config_path, role, settings) if config_path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in settings:
        flag_value = getattr(args, setting.name, None)
        if flag_value is not None:
            values[setting.name], sources[setting.name] = flag_value, f"flag {setting.flag}"
        elif setting.env in os.environ:
            values[setting.name] = _parse(setting, os.environ[setting.env], f"${setting.env}")
            sources[setting.name] = f"environment ${setting.env}"
        elif setting.name in from_file:
            raw = from_file[setting.name]
            text = _toml_to_text(raw)
            values[setting.name] = _parse(setting, text, f"{setting.name} in {config_path}")
            sources[setting.name] = f"config file {config_path}"
        else:
            values[setting.name], sources[setting.name] = setting.default, "default"
    return Resolved(values, sources)


def _toml_to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(setting: Setting, text: str, where: str) -> Any:
    try:
        return setting.parse(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
