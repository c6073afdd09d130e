"""Runtime configuration: command-line flags over environment variables over defaults."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec

from engine.calendar import DEFAULT_TZ

DEFAULT_DATA_DIR = ".onecard"
DEFAULT_HTTP = "127.0.0.1:8080"
DEFAULT_ISO = "127.0.0.1:8583"


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a running engine needs to know."""

    dsn: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    http: str = DEFAULT_HTTP
    iso: str = DEFAULT_ISO
    admin_token: str = ""
    read_token: str = ""
    tz: str = DEFAULT_TZ


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 in brackets) into its parts; raises ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def tokens_from_env(data_dir: str) -> tuple[str, str]:
    """The admin and read tokens: from the environment, else generated once and kept in
    ``DATA_DIR/tokens`` (mode 0600) so a restarted engine keeps accepting them."""
    admin = os.environ.get("ONECARD_ADMIN_TOKEN", "")
    read = os.environ.get("ONECARD_READ_TOKEN", "")
    if admin and read:
        return admin, read
    path = Path(data_dir) / "tokens"
    stored: dict[str, str] = {}
    if path.exists():
        stored = msgspec.json.decode(path.read_bytes(), type=dict[str, str])
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {"admin": secrets.token_urlsafe(24), "read": secrets.token_urlsafe(24)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(stored))
    return admin or stored["admin"], read or stored["read"]
