"""Note content at rest (behaviour §10): encryption keys, encoding, decoding and the content hash.

Formats of a ``documents`` row:

- ``content_alg = 'aes-256-gcm'``: ``content_ciphertext`` = base64(ciphertext ‖ 16-byte GCM tag),
  ``content_iv`` = base64(12-byte IV), no associated data; ``content_key_version`` picks the key:
  1 = ``CONTENT_ENCRYPTION_KEY``, n in 2..10 = ``CONTENT_ENCRYPTION_KEY_V<n>``. New content uses the
  highest configured version.
- ``content_alg = 'none'`` (no key configured): ``content_ciphertext`` = base64 of the UTF-8 text,
  ``content_iv = 'none'``, ``content_key_version = 0``.

Decoding never raises: a note that cannot be read comes back as empty text with a short reason, so
one bad row never breaks a run. Key material never appears in messages or reprs.

The content hash normalises exactly as the backend does (see :func:`normalize_markdown`), so both
sides compute the same hash for the same text. :func:`storable_text` / :func:`storable_json` make
text and JSON safe for Postgres ``text``/``jsonb`` columns (no NUL, no lone surrogates).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALG_AES_256_GCM",
    "ALG_NONE",
    "IV_LENGTH",
    "KEY_LENGTH",
    "MAX_KEY_VERSION",
    "ContentKeyError",
    "ContentKeyring",
    "DecodedContent",
    "EncodedContent",
    "content_hash",
    "decode_content",
    "encode_content",
    "is_versioned_key_env_name",
    "key_env_name",
    "normalize_markdown",
    "storable_json",
    "storable_text",
    "utf8_bytes",
]

ALG_AES_256_GCM = "aes-256-gcm"
ALG_NONE = "none"
IV_NONE = "none"
KEY_LENGTH = 32
IV_LENGTH = 12
MAX_KEY_VERSION = 10
_KEY_ENV = "CONTENT_ENCRYPTION_KEY"
_VERSIONED_KEY_ENV = re.compile(r"^CONTENT_ENCRYPTION_KEY_V\d+$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUL = "\x00"
# A JavaScript multiline ``$`` (the backend's ``/[\t ]+$/gm``) matches before every line terminator
# ECMAScript knows — LF, CR, U+2028, U+2029 — and at the end of the text.
_TRAILING_BLANKS = re.compile(r"[ \t]+(?=[\n\r\u2028\u2029]|\Z)")
_EXTRA_NEWLINES = re.compile(r"\n{3,}")
_MAX_DETAIL = 32


class ContentKeyError(ValueError):
    """A content encryption key is malformed; the message names the variable, never the value."""


def key_env_name(version: int) -> str:
    """Environment variable holding key ``version``: 1 → ``CONTENT_ENCRYPTION_KEY``, n → ``..._V<n>``."""
    return _KEY_ENV if version == 1 else f"{_KEY_ENV}_V{version}"


def is_versioned_key_env_name(name: str) -> bool:
    """Whether ``name`` has the shape ``CONTENT_ENCRYPTION_KEY_V<n>`` (supported version or not)."""
    return _VERSIONED_KEY_ENV.match(name) is not None


def _b64decode(value: str) -> bytes:
    """Decode base64 as leniently as Node's ``Buffer.from(s, 'base64')`` does for well-formed input:
    whitespace ignored, standard or URL-safe alphabet, padding optional. Raises ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError("not a string")
    cleaned = "".join(value.split()).replace("-", "+").replace("_", "/").rstrip("=")
    if len(cleaned) % 4 == 1:
        raise ValueError("truncated base64")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid base64") from exc


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def utf8_bytes(text: str) -> bytes:
    """UTF-8 bytes of ``text``. A lone surrogate (possible in text decoded from JSON) becomes U+FFFD,
    as JavaScript's ``Buffer.from(s, 'utf8')`` and ``hash.update(s)`` do, so sizes and hashes agree."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode("utf-8")


def storable_text(text: str) -> str:
    """``text`` as a database text column can hold it: NUL characters (which Postgres refuses in
    ``text`` and ``jsonb``) are removed, and lone surrogates (possible in text decoded from JSON, which
    neither UTF-8 nor Postgres can carry) become U+FFFD, as the backend's ``Buffer.from(s, 'utf8')``
    turns them. Every other character is kept; clean text comes back unchanged."""
    if _NUL in text:
        text = text.replace(_NUL, "")
    return _SURROGATE.sub("\ufffd", text)


def storable_json(value: Any) -> Any:
    """A copy of a JSON-like value that ``jsonb`` accepts: every string (dict keys included) through
    :func:`storable_text`, NaN and ±infinity → ``None`` (as ``JSON.stringify`` writes them), tuples →
    lists. Other values are returned as they are."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {storable_text(str(k)): storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(v) for v in value]
    return value


def _reject_unsupported_key_names(env: Mapping[str, str], supported: Mapping[str, int]) -> None:
    """A non-blank ``CONTENT_ENCRYPTION_KEY_V<n>`` outside ``_V2``..``_V10`` is a misnamed key: refuse it."""
    for name in sorted(env):
        if is_versioned_key_env_name(name) and name not in supported and (env.get(name) or "").strip():
            raise ContentKeyError(
                f"{name} is not a supported key variable: use {_KEY_ENV} for version 1 and "
                f"{_KEY_ENV}_V2..{_KEY_ENV}_V{MAX_KEY_VERSION} for later versions"
            )


def _decode_key(name: str, raw: str) -> bytes:
    """The 32 key bytes of one variable's base64 value; the message names the variable, never the key."""
    try:
        key = _b64decode(raw)
    except ValueError:
        raise ContentKeyError(f"{name} is not valid base64 (expected base64 of {KEY_LENGTH} bytes)") from None
    if len(key) != KEY_LENGTH:
        raise ContentKeyError(
            f"{name} must be base64 of exactly {KEY_LENGTH} bytes, got {len(key)} bytes after decoding"
        )
    return key


@dataclass(frozen=True)
class ContentKeyring:
    """Immutable set of AES-256 keys by version (1..10). Build it with :meth:`from_env`,
    :meth:`from_keys` or :meth:`empty`; the repr lists versions only."""

    _entries: tuple[tuple[int, bytes], ...] = field(default=(), repr=False)

    @classmethod
    def empty(cls) -> ContentKeyring:
        """No keys: new content is stored with alg ``none``; encrypted rows cannot be decoded."""
        return cls(())

    @classmethod
    def from_keys(cls, keys: Mapping[int, bytes]) -> ContentKeyring:
        """Keys by version. Raises :class:`ContentKeyError` for a version outside 1..10 or a key that is
        not exactly 32 bytes (the message names the version's variable, never the key)."""
        entries: list[tuple[int, bytes]] = []
        for version, key in keys.items():
            if (
                isinstance(version, bool)
                or not isinstance(version, int)
                or not 1 <= version <= MAX_KEY_VERSION
            ):
                raise ContentKeyError(f"content key version must be 1..{MAX_KEY_VERSION}, got {version!r}")
            if not isinstance(key, bytes | bytearray) or len(key) != KEY_LENGTH:
                size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
                raise ContentKeyError(
                    f"{key_env_name(version)} must be exactly {KEY_LENGTH} bytes, got {size}"
                )
            entries.append((version, bytes(key)))
        return cls(tuple(sorted(entries)))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ContentKeyring:
        """Read ``CONTENT_ENCRYPTION_KEY`` (version 1) and ``CONTENT_ENCRYPTION_KEY_V2``..``_V10``.

        Unset or blank variables are skipped (gaps are fine: v1 and v3 without v2). Each set value must
        be base64 (standard or URL-safe, padding optional, surrounding whitespace ignored) of exactly 32
        bytes. Raises :class:`ContentKeyError` naming the variable when a value is not base64 or has the
        wrong length, and when a non-blank ``CONTENT_ENCRYPTION_KEY_V<n>`` is set that is not one of
        ``_V2``..``_V10`` (e.g. ``_V1`` or ``_V11``), so a misnamed key never silently leaves content
        unencrypted. Messages never contain key material.
        """
        supported = {key_env_name(v): v for v in range(1, MAX_KEY_VERSION + 1)}
        _reject_unsupported_key_names(env, supported)
        keys: dict[int, bytes] = {}
        for name, version in supported.items():
            raw = env.get(name)
            if raw is not None and raw.strip() != "":
                keys[version] = _decode_key(name, raw)
        return cls.from_keys(keys)

    @property
    def versions(self) -> tuple[int, ...]:
        """Configured versions, ascending."""
        return tuple(version for version, _ in self._entries)

    @property
    def newest_version(self) -> int | None:
        """Highest configured version (used for new content), ``None`` when no key is configured."""
        return self._entries[-1][0] if self._entries else None

    def key(self, version: int) -> bytes | None:
        """Key for ``version``, ``None`` when that version is not configured."""
        for entry_version, key in self._entries:
            if entry_version == version:
                return key
        return None

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"ContentKeyring(versions={self.versions})"


@dataclass(frozen=True)
class EncodedContent:
    """Column values for a ``documents`` row (``content_*``)."""

    ciphertext: str
    iv: str
    alg: str
    key_version: int
    content_hash: str
    size_bytes: int


@dataclass(frozen=True)
class DecodedContent:
    """Decoded note text; on failure ``text`` is ``""`` and ``error`` a short reason (no content)."""

    text: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def normalize_markdown(markdown: str) -> str:
    """The form hashed by :func:`content_hash`, exactly the backend's: CRLF and lone CR → LF, then spaces
    and tabs at the end of every line removed, then every run of 3 or more newlines replaced by exactly 2.
    A line ends where a JavaScript multiline regex says it does: at LF, and also at U+2028 (line
    separator) and U+2029 (paragraph separator), so ``"x \u2028y"`` becomes ``"x\u2028y"``; those two
    characters themselves are kept and do not count as newlines for the collapsing. Nothing else changes
    (no trimming of leading blanks or of the whole text)."""
    text = markdown.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_BLANKS.sub("", text)
    return _EXTRA_NEWLINES.sub("\n\n", text)


def content_hash(markdown: str) -> str:
    """SHA-256 hex digest (64 lowercase chars) of the UTF-8 bytes of :func:`normalize_markdown`."""
    return hashlib.sha256(utf8_bytes(normalize_markdown(markdown))).hexdigest()


def encode_content(markdown: str, keyring: ContentKeyring, *, iv: bytes | None = None) -> EncodedContent:
    """Encode ``markdown`` for storage.

    With keys: AES-256-GCM under the newest version, with ``iv`` (must be 12 bytes, else
    ``ValueError``) or a fresh random 12-byte IV. Without keys: alg ``none``, iv ``none``, version 0,
    and ``iv`` is ignored. The stored text is ``markdown`` exactly; ``content_hash`` is of its
    normalised form and ``size_bytes`` its UTF-8 length.
    """
    data = utf8_bytes(markdown)
    digest = content_hash(markdown)
    version = keyring.newest_version
    if version is None:
        return EncodedContent(_b64encode(data), IV_NONE, ALG_NONE, 0, digest, len(data))
    nonce = os.urandom(IV_LENGTH) if iv is None else bytes(iv)
    if len(nonce) != IV_LENGTH:
        raise ValueError(f"iv must be {IV_LENGTH} bytes, got {len(nonce)}")
    key = keyring.key(version)
    if key is None:  # cannot happen: newest_version is always a configured version
        raise RuntimeError(f"content key version {version} vanished from the keyring")
    sealed = AESGCM(key).encrypt(nonce, data, None)
    return EncodedContent(_b64encode(sealed), _b64encode(nonce), ALG_AES_256_GCM, version, digest, len(data))


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."


def decode_content(
    ciphertext: str, iv: str, alg: str, key_version: int | None, keyring: ContentKeyring
) -> DecodedContent:
    """Decode a stored note; never raises.

    Failures give ``DecodedContent("", reason)`` with reason one of: ``unknown_alg:<alg>``,
    ``missing_key_version:<n>`` (version not configured, or not an integer), ``bad_base64``
    (ciphertext or IV), ``bad_iv`` (IV length AES-GCM cannot use), ``decrypt_failed`` (wrong key or
    tampered data: the GCM tag does not verify), ``bad_utf8``, or ``decode_failed`` (anything else).
    ``alg`` is matched ignoring case and surrounding whitespace.
    """
    try:
        data = _stored_bytes(ciphertext, iv, alg, key_version, keyring)
        if isinstance(data, str):
            return DecodedContent("", data)
        try:
            return DecodedContent(data.decode("utf-8"), None)
        except UnicodeDecodeError:
            return DecodedContent("", "bad_utf8")
    except Exception:  # the contract is "never raises"; the reason carries no content
        return DecodedContent("", "decode_failed")


def _stored_bytes(
    ciphertext: str, iv: str, alg: str, key_version: int | None, keyring: ContentKeyring
) -> bytes | str:
    """The stored plaintext bytes, or the failure reason (a ``str``) of :func:`decode_content`."""
    name = alg.strip().lower() if isinstance(alg, str) else ""
    if name == ALG_NONE:
        try:
            return _b64decode(ciphertext)
        except ValueError:
            return "bad_base64"
    if name == ALG_AES_256_GCM:
        return _aes_gcm_bytes(ciphertext, iv, key_version, keyring)
    return f"unknown_alg:{_short(alg)}"


def _aes_gcm_bytes(ciphertext: str, iv: str, key_version: int | None, keyring: ContentKeyring) -> bytes | str:
    if isinstance(key_version, bool) or not isinstance(key_version, int):
        return f"missing_key_version:{_short(key_version)}"
    key = keyring.key(key_version)
    if key is None:
        return f"missing_key_version:{key_version}"
    try:
        sealed = _b64decode(ciphertext)
        nonce = _b64decode(iv)
    except ValueError:
        return "bad_base64"
    try:
        return AESGCM(key).decrypt(nonce, sealed, None)
    except InvalidTag:
        return "decrypt_failed"
    except ValueError:
        return "bad_iv"
