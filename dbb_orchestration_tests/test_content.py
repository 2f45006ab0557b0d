"""Note content at rest (behaviour §10): keys, encoding, decoding, hashing."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dbb_orchestration.content import (
    ContentKeyError,
    ContentKeyring,
    DecodedContent,
    EncodedContent,
    content_hash,
    decode_content,
    encode_content,
    key_env_name,
    normalize_markdown,
    storable_json,
    storable_text,
    utf8_bytes,
)

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))
KEY3 = bytes(range(200, 232))
IV = bytes(range(1, 13))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- keyring ---------------------------------------------------------------------------------------


def test_empty_env_gives_empty_keyring() -> None:
    ring = ContentKeyring.from_env({})
    assert ring.versions == ()
    assert ring.newest_version is None
    assert ring.key(1) is None
    assert not ring
    assert ring == ContentKeyring.empty()


def test_version_one_is_the_unsuffixed_variable() -> None:
    ring = ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY": b64(KEY1)})
    assert ring.versions == (1,)
    assert ring.newest_version == 1
    assert ring.key(1) == KEY1
    assert ring.key(2) is None
    assert ring


def test_versions_with_a_gap() -> None:
    ring = ContentKeyring.from_env(
        {"CONTENT_ENCRYPTION_KEY": b64(KEY1), "CONTENT_ENCRYPTION_KEY_V3": b64(KEY3)}
    )
    assert ring.versions == (1, 3)
    assert ring.newest_version == 3
    assert (ring.key(1), ring.key(2), ring.key(3)) == (KEY1, None, KEY3)


def test_all_ten_versions_and_only_later_ones() -> None:
    env = {key_env_name(v): b64(bytes([v]) * 32) for v in range(1, 11)}
    ring = ContentKeyring.from_env(env)
    assert ring.versions == tuple(range(1, 11))
    assert ring.newest_version == 10
    assert ring.key(10) == bytes([10]) * 32
    only_v2 = ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY_V2": b64(KEY2)})
    assert (only_v2.versions, only_v2.newest_version) == ((2,), 2)


def test_key_env_names() -> None:
    assert key_env_name(1) == "CONTENT_ENCRYPTION_KEY"
    assert key_env_name(2) == "CONTENT_ENCRYPTION_KEY_V2"
    assert key_env_name(10) == "CONTENT_ENCRYPTION_KEY_V10"


def test_blank_variables_are_unset() -> None:
    ring = ContentKeyring.from_env(
        {"CONTENT_ENCRYPTION_KEY": "", "CONTENT_ENCRYPTION_KEY_V2": "  ", "CONTENT_ENCRYPTION_KEY_V11": ""}
    )
    assert ring.versions == ()


def test_lenient_base64_spellings() -> None:
    # a key whose base64 contains '+' and '/' (URL-safe: '-' and '_') and needs one '=' of padding
    key = bytes([0xFB, 0xFF] * 16)
    standard = b64(key)
    assert "+" in standard or "/" in standard
    assert standard.endswith("=")
    urlsafe_unpadded = base64.urlsafe_b64encode(key).decode().rstrip("=")
    for spelling in [standard, f"  {standard}\n", urlsafe_unpadded]:
        assert ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY": spelling}).key(1) == key


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_wrong_key_length_names_the_variable_not_the_value(size: int) -> None:
    value = b64(b"k" * size) if size else "AA=="
    with pytest.raises(ContentKeyError) as info:
        ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY": b64(KEY1), "CONTENT_ENCRYPTION_KEY_V4": value})
    message = str(info.value)
    assert "CONTENT_ENCRYPTION_KEY_V4" in message
    assert "32 bytes" in message
    assert value not in message
    assert isinstance(info.value, ValueError)


def test_hex_key_is_rejected_as_wrong_length() -> None:
    hex_key = KEY1.hex()  # 64 hex chars decode as base64 to 48 bytes
    with pytest.raises(
        ContentKeyError, match=r"^CONTENT_ENCRYPTION_KEY must be base64 of exactly 32 bytes, got 48 bytes"
    ):
        ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY": hex_key})


@pytest.mark.parametrize("value", ["not base64!!", "abcde", "é" * 44])
def test_non_base64_key_names_the_variable(value: str) -> None:
    with pytest.raises(ContentKeyError) as info:
        ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY_V2": value})
    assert str(info.value).startswith("CONTENT_ENCRYPTION_KEY_V2 is not valid base64")
    assert value not in str(info.value)


@pytest.mark.parametrize(
    "name", ["CONTENT_ENCRYPTION_KEY_V1", "CONTENT_ENCRYPTION_KEY_V11", "CONTENT_ENCRYPTION_KEY_V0"]
)
def test_unsupported_version_variable_is_an_error(name: str) -> None:
    with pytest.raises(ContentKeyError) as info:
        ContentKeyring.from_env({name: b64(KEY1)})
    assert str(info.value).startswith(f"{name} is not a supported key variable")
    assert b64(KEY1) not in str(info.value)


def test_unrelated_variables_are_ignored() -> None:
    ring = ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY_FILE": "/run/secrets/key", "OTHER": "x"})
    assert ring.versions == ()


def test_from_keys_validation() -> None:
    assert ContentKeyring.from_keys({3: KEY3, 1: KEY1}).versions == (1, 3)
    with pytest.raises(ContentKeyError, match="1..10"):
        ContentKeyring.from_keys({0: KEY1})
    with pytest.raises(ContentKeyError, match="1..10"):
        ContentKeyring.from_keys({11: KEY1})
    with pytest.raises(
        ContentKeyError, match=r"^CONTENT_ENCRYPTION_KEY_V5 must be exactly 32 bytes, got 31$"
    ):
        ContentKeyring.from_keys({5: KEY1[:31]})


def test_keyring_is_immutable_and_hides_keys() -> None:
    ring = ContentKeyring.from_keys({1: KEY1, 3: KEY3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ring._entries = ()  # type: ignore[misc]
    text = repr(ring) + str(ring)
    assert text == "ContentKeyring(versions=(1, 3))" * 2
    assert b64(KEY1) not in text
    hash(ring)  # usable inside frozen settings


# --- encode / decode -------------------------------------------------------------------------------

V1 = ContentKeyring.from_keys({1: KEY1})
V1_V3 = ContentKeyring.from_keys({1: KEY1, 3: KEY3})
NO_KEYS = ContentKeyring.empty()
NOTE = "# Brain bit 🧠\r\nCafé — naïve text  \n\n\n\n- item\t\n"


def test_round_trip_with_v1() -> None:
    encoded = encode_content(NOTE, V1)
    assert encoded.alg == "aes-256-gcm"
    assert encoded.key_version == 1
    assert len(base64.b64decode(encoded.iv)) == 12
    assert len(base64.b64decode(encoded.ciphertext)) == len(NOTE.encode()) + 16
    assert NOTE.encode() not in base64.b64decode(encoded.ciphertext)
    decoded = decode_content(encoded.ciphertext, encoded.iv, encoded.alg, encoded.key_version, V1)
    assert decoded == DecodedContent(NOTE, None)
    assert decoded.ok


def test_newest_version_encrypts_and_old_versions_still_decode() -> None:
    old = encode_content("old note", V1)
    new = encode_content("new note", V1_V3)
    assert (old.key_version, new.key_version) == (1, 3)
    # v3 content really is under KEY3
    assert (
        AESGCM(KEY3).decrypt(base64.b64decode(new.iv), base64.b64decode(new.ciphertext), None) == b"new note"
    )
    assert decode_content(old.ciphertext, old.iv, old.alg, 1, V1_V3) == DecodedContent("old note", None)
    assert decode_content(new.ciphertext, new.iv, new.alg, 3, V1_V3) == DecodedContent("new note", None)
    # a process that only knows v1 cannot read v3 content
    assert decode_content(new.ciphertext, new.iv, new.alg, 3, V1) == DecodedContent(
        "", "missing_key_version:3"
    )


def test_given_iv_is_deterministic_and_random_iv_is_fresh() -> None:
    a = encode_content("same", V1, iv=IV)
    b = encode_content("same", V1, iv=IV)
    assert a == b
    assert a.iv == b64(IV)
    c = encode_content("same", V1)
    d = encode_content("same", V1)
    assert c.iv != d.iv
    assert c.ciphertext != d.ciphertext


def test_random_iv_comes_from_os_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_urandom(n: int) -> bytes:
        calls.append(n)
        return b"\x07" * n

    monkeypatch.setattr("dbb_orchestration.content.os.urandom", fake_urandom)
    encoded = encode_content("x", V1)
    assert calls == [12]
    assert encoded.iv == b64(b"\x07" * 12)


@pytest.mark.parametrize("iv", [b"", bytes(11), bytes(13), bytes(16)])
def test_wrong_iv_length_is_rejected(iv: bytes) -> None:
    with pytest.raises(ValueError, match="iv must be 12 bytes"):
        encode_content("x", V1, iv=iv)


def test_known_vector_encrypted_independently() -> None:
    text = "Known vector: ünïcødé & <html>"
    sealed = AESGCM(KEY2).encrypt(IV, text.encode("utf-8"), None)
    ring = ContentKeyring.from_env({"CONTENT_ENCRYPTION_KEY_V2": b64(KEY2)})
    assert decode_content(b64(sealed), b64(IV), "aes-256-gcm", 2, ring) == DecodedContent(text, None)
    # and encoding with the same key and IV produces exactly those bytes
    encoded = encode_content(text, ring, iv=IV)
    assert (encoded.ciphertext, encoded.iv, encoded.key_version) == (b64(sealed), b64(IV), 2)


def test_published_gcm_vector() -> None:
    # McGrew & Viega GCM spec, test case 14: AES-256, zero key, zero 96-bit IV, 16 zero bytes.
    ciphertext = bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18")
    tag = bytes.fromhex("d0d1c8a799996bf0265b98b5d48ab919")
    ring = ContentKeyring.from_keys({1: bytes(32)})
    decoded = decode_content(b64(ciphertext + tag), b64(bytes(12)), "aes-256-gcm", 1, ring)
    assert decoded == DecodedContent("\x00" * 16, None)
    encoded = encode_content("\x00" * 16, ring, iv=bytes(12))
    assert base64.b64decode(encoded.ciphertext) == ciphertext + tag


def test_none_format() -> None:
    encoded = encode_content(NOTE, NO_KEYS, iv=IV)  # iv ignored without keys
    assert encoded == EncodedContent(
        ciphertext=b64(NOTE.encode("utf-8")),
        iv="none",
        alg="none",
        key_version=0,
        content_hash=sha("# Brain bit 🧠\nCafé — naïve text\n\n- item\n"),
        size_bytes=len(NOTE.encode("utf-8")),
    )
    assert decode_content(encoded.ciphertext, "none", "none", 0, NO_KEYS) == DecodedContent(NOTE, None)
    # 'none' content decodes whatever keys are configured
    assert decode_content(encoded.ciphertext, "none", "none", 0, V1_V3) == DecodedContent(NOTE, None)


def test_encode_metadata_hash_and_size() -> None:
    text = "héllo 🧠  \r\n"
    encoded = encode_content(text, V1)
    assert encoded.size_bytes == 15  # h1 é2 l1 l1 o1, space 1, brain 4, two spaces 2, CR 1, LF 1
    assert encoded.content_hash == sha("héllo 🧠\n")


def test_empty_note() -> None:
    for ring in (NO_KEYS, V1):
        encoded = encode_content("", ring)
        assert encoded.size_bytes == 0
        assert encoded.content_hash == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        assert (
            decode_content(encoded.ciphertext, encoded.iv, encoded.alg, encoded.key_version, ring).text == ""
        )


def test_lone_surrogate_is_encoded_like_javascript() -> None:
    text = "a\ud800b"
    assert utf8_bytes(text) == b"a\xef\xbf\xbdb"
    encoded = encode_content(text, NO_KEYS)
    assert encoded.size_bytes == 5
    assert encoded.content_hash == hashlib.sha256(b"a\xef\xbf\xbdb").hexdigest()
    assert decode_content(encoded.ciphertext, "none", "none", 0, NO_KEYS).text == "a\ufffdb"


# --- decode failures -------------------------------------------------------------------------------


def _flip(data_b64: str, index: int) -> str:
    raw = bytearray(base64.b64decode(data_b64))
    raw[index] ^= 0x01
    return b64(bytes(raw))


def test_tampered_ciphertext_tag_or_iv_fails_to_decrypt() -> None:
    encoded = encode_content("secret note", V1, iv=IV)
    body = (encoded.ciphertext, encoded.iv, encoded.alg, 1)
    failed = DecodedContent("", "decrypt_failed")
    assert decode_content(_flip(encoded.ciphertext, 0), *body[1:], V1) == failed
    assert decode_content(_flip(encoded.ciphertext, -1), *body[1:], V1) == failed  # the tag
    assert decode_content(encoded.ciphertext, _flip(encoded.iv, 0), encoded.alg, 1, V1) == failed
    truncated = b64(base64.b64decode(encoded.ciphertext)[:-1])
    assert decode_content(truncated, *body[1:], V1) == failed
    assert decode_content(b64(b"short"), *body[1:], V1) == failed  # shorter than a tag
    # the right version number with a different key
    other = ContentKeyring.from_keys({1: KEY2})
    assert decode_content(*body, other) == failed


@pytest.mark.parametrize(
    ("version", "error"),
    [
        (3, "missing_key_version:3"),
        (2, "missing_key_version:2"),
        (0, "missing_key_version:0"),
        (None, "missing_key_version:None"),
        ("1", "missing_key_version:1"),
        (True, "missing_key_version:True"),
    ],
)
def test_missing_key_version(version: Any, error: str) -> None:
    encoded = encode_content("x", V1)
    result = decode_content(encoded.ciphertext, encoded.iv, "aes-256-gcm", version, V1)
    assert result == DecodedContent("", error)


def test_encrypted_content_without_any_key() -> None:
    encoded = encode_content("x", V1)
    assert decode_content(encoded.ciphertext, encoded.iv, encoded.alg, 1, NO_KEYS) == DecodedContent(
        "", "missing_key_version:1"
    )


@pytest.mark.parametrize(
    ("ciphertext", "iv", "alg", "error"),
    [
        ("not base64!!", b64(IV), "aes-256-gcm", "bad_base64"),
        (b64(b"x" * 20), "not base64!!", "aes-256-gcm", "bad_base64"),
        ("abcde", b64(IV), "aes-256-gcm", "bad_base64"),  # impossible length
        ("@@@@", "none", "none", "bad_base64"),
        ("abcde", "none", "none", "bad_base64"),
        # 'none' happens to be valid base64 (3 bytes), but no usable GCM IV
        (b64(b"x" * 20), "none", "aes-256-gcm", "bad_iv"),
    ],
)
def test_bad_base64(ciphertext: str, iv: str, alg: str, error: str) -> None:
    assert decode_content(ciphertext, iv, alg, 1, V1) == DecodedContent("", error)


def test_iv_of_unusable_length() -> None:
    encoded = encode_content("x", V1)
    assert decode_content(encoded.ciphertext, b64(bytes(4)), "aes-256-gcm", 1, V1) == DecodedContent(
        "", "bad_iv"
    )
    assert decode_content(encoded.ciphertext, "", "aes-256-gcm", 1, V1) == DecodedContent("", "bad_iv")


@pytest.mark.parametrize(
    ("alg", "error"),
    [
        ("xyz", "unknown_alg:xyz"),
        ("aes-128-gcm", "unknown_alg:aes-128-gcm"),
        ("", "unknown_alg:"),
        (None, "unknown_alg:None"),
        ("a" * 40, "unknown_alg:" + "a" * 32 + "..."),
    ],
)
def test_unknown_alg(alg: str, error: str) -> None:
    assert decode_content(b64(b"x"), "none", alg, 0, V1) == DecodedContent("", error)


def test_alg_case_and_whitespace_are_ignored() -> None:
    encoded = encode_content("Case", V1)
    assert decode_content(encoded.ciphertext, encoded.iv, " AES-256-GCM ", 1, V1).text == "Case"
    assert decode_content(b64(b"plain"), "none", "NONE", 0, V1).text == "plain"


def test_invalid_utf8() -> None:
    assert decode_content(b64(b"\xff\xfe"), "none", "none", 0, NO_KEYS) == DecodedContent("", "bad_utf8")
    sealed = AESGCM(KEY1).encrypt(IV, b"\xc3\x28", None)
    assert decode_content(b64(sealed), b64(IV), "aes-256-gcm", 1, V1) == DecodedContent("", "bad_utf8")


def test_decode_never_raises_on_garbage() -> None:
    rng = random.Random(1234)
    values: list[Any] = [None, 0, 1, 3, -1, "", "none", "aes-256-gcm", "==", b"bytes", 3.5, [], "A" * 17]
    good = encode_content("good", V1)
    values += [good.ciphertext, good.iv]
    for _ in range(2000):
        a, b, c, d = (rng.choice(values) for _ in range(4))
        result = decode_content(a, b, c, d, V1)
        assert isinstance(result, DecodedContent)
        if result.error is not None:
            assert result.text == ""


# --- normalisation and hash ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("", ""),
        ("plain", "plain"),
        ("a\r\nb", "a\nb"),
        ("a\rb", "a\nb"),
        ("a\r\rb", "a\n\nb"),
        ("a\n\r\nb", "a\n\nb"),
        ("a  \nb\t\n", "a\nb\n"),
        ("a \t \t\nb", "a\nb"),
        ("end  ", "end"),
        ("a\n\n\nb", "a\n\nb"),
        ("a\n\n\n\n\n\nb", "a\n\nb"),
        ("a\r\n\r\n\r\nb", "a\n\nb"),
        ("a\n  \n\t\n\nb", "a\n\nb"),  # blank-looking lines become empty, then collapse
        ("a\n\n\n", "a\n\n"),
        ("\n\n\n\na", "\n\na"),
        ("  indented\n\tcode", "  indented\n\tcode"),  # leading whitespace kept
        ("nbsp\u00a0\nx", "nbsp\u00a0\nx"),  # only spaces and tabs are trailing blanks
        ("a  \r\n\r\n  \r\n b ", "a\n\n b"),
        # A line also ends at U+2028 / U+2029 (JavaScript's multiline ``$``); they stay in the text and
        # are not newlines for the collapsing of blank lines.
        ("x \u2028y", "x\u2028y"),
        ("x\t\u2029y", "x\u2029y"),
        ("a \u2028 \u2028 \u2028b", "a\u2028\u2028\u2028b"),
        ("a\u2028\u2028\u2028\u2028b", "a\u2028\u2028\u2028\u2028b"),
        ("a \r\u2028b", "a\n\u2028b"),
        ("x\u2028 y", "x\u2028 y"),  # leading blanks after the separator are kept
        ("x \u0085y", "x \u0085y"),  # NEL is not a JavaScript line terminator
        ("x \vy \fz", "x \vy \fz"),
    ],
)
def test_normalize_markdown(raw: str, normalised: str) -> None:
    assert normalize_markdown(raw) == normalised
    assert normalize_markdown(normalised) == normalised  # idempotent
    assert content_hash(raw) == hashlib.sha256(normalised.encode("utf-8")).hexdigest()


def test_content_hash_known_values() -> None:
    assert content_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash("abc \t") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_content_hash_with_unicode_line_separators_matches_the_backend() -> None:
    # The backend's normalisation, done by hand: CRLF/CR → LF; ``/[\t ]+$/gm`` removes the blanks
    # before each LF, U+2028, U+2029 and the end; then 3+ LF → 2.
    raw = "Title \t\u2029\u2029Body  \u2028 \u2028end\t\r\n\r\n\r\nTail \u2029"
    by_hand = "Title\u2029\u2029Body\u2028\u2028end\n\nTail\u2029"
    assert normalize_markdown(raw) == by_hand
    assert hashlib.sha256(by_hand.encode("utf-8")).hexdigest() == (
        "475c01cea8669b434f90f9850fb261070b3208cf57a63d5e289f230a02907348"
    )
    assert content_hash(raw) == "475c01cea8669b434f90f9850fb261070b3208cf57a63d5e289f230a02907348"
    # a blank before a line separator goes too: "x \u2028y" hashes as "x\u2028y"
    assert content_hash("x \u2028y") == "1b7192a795a80fdb263dfb49db6d0632cb89d199a30581af3a99936bb963f01e"


def test_equivalent_texts_share_a_hash_and_different_texts_do_not() -> None:
    assert content_hash("Title\r\n\r\n\r\nBody  ") == content_hash("Title\n\nBody")
    assert content_hash("Title\n\nBody") != content_hash("Title\nBody")
    assert content_hash("Body") != content_hash(" Body")
    assert len(content_hash("x")) == 64
    assert content_hash("x") == content_hash("x").lower()


# --- text a database column can hold ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("", ""),
        ("plain — text 🧠", "plain — text 🧠"),
        ("a\x00b", "ab"),
        ("\x00\x00", ""),
        ("lone \ud800 high", "lone \ufffd high"),
        ("lone \udfff low\x00", "lone \ufffd low"),
        ("tab\tnl\ncr\r\x01\x7f", "tab\tnl\ncr\r\x01\x7f"),  # other control characters are storable
    ],
)
def test_storable_text(raw: str, stored: str) -> None:
    assert storable_text(raw) == stored
    assert storable_text(stored) == stored
    stored.encode("utf-8")  # always encodable


def test_storable_json_cleans_strings_keys_and_non_finite_numbers() -> None:
    raw = {
        "Na\x00me": "ti\x00tle",
        "nested": {"list": ["a\x00", 1, 2.5, float("nan"), None, True, ("x\ud83d",)]},
        "inf": float("inf"),
        "neg": float("-inf"),
    }
    assert storable_json(raw) == {
        "Name": "title",
        "nested": {"list": ["a", 1, 2.5, None, None, True, ["x\ufffd"]]},
        "inf": None,
        "neg": None,
    }
    assert raw["Na\x00me"] == "ti\x00tle"  # the input is not changed
    assert storable_json("plain") == "plain" and storable_json(3) == 3 and storable_json(None) is None
