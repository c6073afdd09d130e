"""Secrets at rest: card PINs and terminal MAC keys sealed with AES-256-GCM (``cryptography``).

The key lives outside the database: ``ONECARD_SECRET_KEY`` (hex; several keys comma-separated,
the first one seals), else ``DATA_DIR/secret.key`` (one hex key per line, the first one seals;
mode 0600, created on first start). A dump of the database alone therefore opens nothing.

A sealed value is ``version (1) | key id (4) | nonce (12) | ciphertext + tag``. The key id says
which key sealed it, so a key ring can hold the new key and the previous one while
``onecard rotate-secret`` re-seals everything; the associated data binds the value to its row
(``onecard/pin/<ledger>/<card_no>``), so a sealed PIN copied onto another card does not open.

Opened values are cached (bounded): the terminal hot path reads each card's sealed PIN with its
state and must not pay AES-GCM on every swipe. A box made from a key file re-reads the file (at
most once per ``SECRET_KEY_RELOAD_S``) when it meets a key id it does not know and before it
seals, so a running engine follows a rotation made by another process without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine import limits

log = logging.getLogger(__name__)

KEY_BYTES: Final = 32  # AES-256
KEY_FILE: Final = "secret.key"
ENV_KEY: Final = "ONECARD_SECRET_KEY"
_VERSION: Final = b"\x01"
_KID_BYTES: Final = 4
_NONCE_BYTES: Final = 12
_HEADER: Final = 1 + _KID_BYTES + _NONCE_BYTES


class SecretKeyError(RuntimeError):
    """The key is missing, malformed, unsafe on disk, or not the one the data was sealed with."""


class SecretError(ValueError):
    """A sealed value that does not open: unknown key, wrong row, or altered."""


def key_id(key: bytes) -> bytes:
    """The 4-byte id of a key, stored beside every value it seals (not secret: a hash)."""
    return hashlib.sha256(b"onecard/secret-key-id/" + key).digest()[:_KID_BYTES]


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return secrets.token_bytes(KEY_BYTES)


def parse_keys(text: str, *, origin: str) -> list[bytes]:
    """Keys from hex text: one per line or comma-separated; the first seals."""
    keys = []
    for part in text.replace(",", "\n").split():
        try:
            key = bytes.fromhex(part)
        except ValueError:
            raise SecretKeyError(f"{origin}: a key is {2 * KEY_BYTES} hex digits") from None
        if len(key) != KEY_BYTES:
            raise SecretKeyError(f"{origin}: a key is {2 * KEY_BYTES} hex digits")
        keys.append(key)
    if not keys:
        raise SecretKeyError(f"{origin}: no key")
    return keys


def write_key_file(path: Path, keys: Sequence[bytes], *, replace: bool) -> None:
    """Write a key ring atomically with mode 0600 (``replace=False``: only if none exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(k.hex() + "\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if it exists: two first starts cannot both create one
    finally:
        tmp.unlink(missing_ok=True)


def read_key_file(path: Path, *, create: bool) -> list[bytes]:
    """The key ring in ``path``; a new one is created first when ``create`` and none exists."""
    if create and not path.exists():
        try:
            write_key_file(path, [new_key()], replace=False)
            log.info("created a new secret key in %s", path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise SecretKeyError(
            f"no secret key: {path} does not exist (and {ENV_KEY} is unset)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SecretKeyError(f"{path}: cannot read the secret key ({type(e).__name__})") from None
    if mode & 0o077:
        raise SecretKeyError(f"{path} is readable by others: chmod 600 {path}")
    return parse_keys(text, origin=str(path))


class SecretBox:
    """Seals and opens small secrets under a key ring (the first key seals).

    ``reload`` (if given) returns the current key ring: used when a value names a key this box
    does not hold, and before sealing, at most once per ``reload_s``.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        reload: Callable[[], list[bytes]] | None = None,
        reload_s: float = limits.SECRET_KEY_RELOAD_S,
        max_cached: int = limits.MAX_CACHED_SECRETS,
    ) -> None:
        if not keys or any(len(k) != KEY_BYTES for k in keys):
            raise SecretKeyError(f"a key is {KEY_BYTES} bytes")
        self._ring: dict[bytes, AESGCM] = {}
        self._primary = b""
        self._set(list(keys))
        self._reload = reload
        self._reload_s = reload_s
        self._reloaded = time.monotonic()
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._max_cached = max_cached
        self._lock = threading.Lock()  # the cache is also used from worker threads (the CLI)

    def _set(self, keys: list[bytes]) -> None:
        ring = {key_id(k): AESGCM(k) for k in keys}
        for kid, aead in self._ring.items():  # keys seen before stay usable for opening
            ring.setdefault(kid, aead)
        self._ring = ring
        self._primary = key_id(keys[0])

    @property
    def key_id(self) -> str:
        """Hex id of the key that seals."""
        return self._primary.hex()

    def knows(self, kid: bytes) -> bool:
        """Whether a key with this id is in the ring."""
        return kid in self._ring

    def maybe_reload(self, *, force: bool = False) -> None:
        """Re-read the key ring (rate-limited unless ``force``)."""
        now = time.monotonic()
        if self._reload is None or (not force and now - self._reloaded < self._reload_s):
            return
        self._reloaded = now
        try:
            self._set(self._reload())
        except SecretKeyError as e:
            log.warning("secret key reload failed: %s", e)

    def seal(self, plain: bytes, aad: bytes) -> bytes:
        """Encrypt ``plain`` bound to ``aad`` under the sealing key."""
        self.maybe_reload()
        nonce = secrets.token_bytes(_NONCE_BYTES)
        kid = self._primary
        return _VERSION + kid + nonce + self._ring[kid].encrypt(nonce, plain, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a sealed value of the row ``aad``; raises SecretError if it does not open."""
        cache_key = (aad, blob)
        plain = self._cache.get(cache_key)
        if plain is not None:
            return plain
        if len(blob) <= _HEADER or blob[:1] != _VERSION:
            raise SecretError("not a sealed value")
        kid = blob[1 : 1 + _KID_BYTES]
        if kid not in self._ring:  # rotated meanwhile? (the source is cheap to ask again)
            self.maybe_reload(force=True)
        aead = self._ring.get(kid)
        if aead is None:
            raise SecretError(f"sealed under an unknown key (id {kid.hex()})")
        try:
            plain = aead.decrypt(blob[1 + _KID_BYTES : _HEADER], blob[_HEADER:], aad)
        except InvalidTag:
            raise SecretError("does not open: altered, or sealed for another row") from None
        with self._lock:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))  # oldest first
            self._cache[cache_key] = plain
        return plain


def blob_key_id(blob: bytes) -> bytes:
    """The key id a sealed value names."""
    return blob[1 : 1 + _KID_BYTES]


# -- what is sealed, and how it is bound to its row ---------------------------------------------


def _pin_aad(ledger: int, card_no: str) -> bytes:
    return f"onecard/pin/{ledger}/{card_no}".encode()


def _mac_aad(ledger: int, terminal_id: str) -> bytes:
    return f"onecard/mac_key/{ledger}/{terminal_id}".encode()


def seal_pin(box: SecretBox, ledger: int, card_no: str, pin: str) -> bytes:
    """A card's PIN, sealed for its row."""
    return box.seal(pin.encode("ascii"), _pin_aad(ledger, card_no))


def open_pin(box: SecretBox, ledger: int, card_no: str, blob: bytes) -> str:
    """A card's PIN from its sealed value."""
    return box.open(blob, _pin_aad(ledger, card_no)).decode("ascii")


def seal_mac_key(box: SecretBox, ledger: int, terminal_id: str, mac_key: bytes) -> bytes:
    """A terminal's MAC key, sealed for its row."""
    return box.seal(mac_key, _mac_aad(ledger, terminal_id))


def open_mac_key(box: SecretBox, ledger: int, terminal_id: str, blob: bytes) -> bytes:
    """A terminal's MAC key from its sealed value."""
    return box.open(blob, _mac_aad(ledger, terminal_id))


# -- where the key comes from --------------------------------------------------------------------


def box_for(data_dir: str | Path | None, *, create: bool = True) -> SecretBox:
    """The box of this installation: ``ONECARD_SECRET_KEY`` if set, else the key file in
    ``data_dir`` (created when missing and ``create``), re-read after a rotation."""
    env = os.environ.get(ENV_KEY, "").strip()
    if env:
        return SecretBox(parse_keys(env, origin=ENV_KEY))
    if data_dir is None:
        raise SecretKeyError(f"no secret key: set {ENV_KEY} or give a data directory")
    path = Path(data_dir) / KEY_FILE
    keys = read_key_file(path, create=create)
    return SecretBox(keys, reload=_KeyFile(path).read)


class _KeyFile:
    """A key file re-read only when it changed (a stat per call otherwise)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: tuple[int, int] | None = None
        self._keys: list[bytes] = []

    def read(self) -> list[bytes]:
        try:
            st = self._path.stat()
        except OSError:
            raise SecretKeyError(f"{self._path}: cannot read the secret key") from None
        seen = (st.st_mtime_ns, st.st_ino)
        if seen != self._seen or not self._keys:
            self._keys = read_key_file(self._path, create=False)
            self._seen = seen
        return self._keys


_configured: Path | None = None
_default: SecretBox | None = None
_default_lock = threading.Lock()


def configure(data_dir: str | Path) -> None:
    """Where this process's default box finds its key file (the CLI calls it at start)."""
    global _configured, _default
    with _default_lock:
        _configured, _default = Path(data_dir), None


def install(box: SecretBox) -> None:
    """Make ``box`` this process's default (used by every Campus not given its own)."""
    global _default
    with _default_lock:
        _default = box


def default_box() -> SecretBox:
    """This process's box: the one installed, else ``ONECARD_SECRET_KEY``, else the key file of
    the configured data directory; with none of these (a library user, a test), a random key
    for this process only, with a warning: what it seals opens nowhere else."""
    global _default
    with _default_lock:
        if _default is None:
            if os.environ.get(ENV_KEY, "").strip() or _configured is not None:
                _default = box_for(_configured)
            else:
                log.warning("no secret key configured: PINs and MAC keys sealed by this "
                            "process can be opened only by it (set %s)", ENV_KEY)
                _default = SecretBox([new_key()])
        return _default
