"""MAC, PIN block and key parsing (contract §5)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from terminals.mac import compute_mac, parse_key, pin_block, verify_mac, verify_pin

KEY = bytes(range(32))


def test_mac_is_truncated_hmac_sha256() -> None:
    data = b"0200 some message bytes"
    assert compute_mac(KEY, data) == hmac.new(KEY, data, hashlib.sha256).digest()[:8]
    assert len(compute_mac(KEY, b"")) == 8


def test_verify_mac_accepts_only_the_exact_mac() -> None:
    data = b"payload"
    mac = compute_mac(KEY, data)
    assert verify_mac(KEY, data, mac)
    assert not verify_mac(KEY, data + b"x", mac)
    assert not verify_mac(bytes(32), data, mac)
    assert not verify_mac(KEY, data, mac[:7])
    assert not verify_mac(KEY, data, bytes([mac[0] ^ 1]) + mac[1:])


def test_pin_block_is_hmac_over_card_colon_pin() -> None:
    expected = hmac.new(KEY, b"6222000011112222:1234", hashlib.sha256).digest()[:8]
    assert pin_block(KEY, "6222000011112222", "1234") == expected


def test_verify_pin() -> None:
    block = pin_block(KEY, "6222000011112222", "1234")
    assert verify_pin(KEY, "6222000011112222", "1234", block)
    assert not verify_pin(KEY, "6222000011112222", "1235", block)
    assert not verify_pin(KEY, "6222000011112223", "1234", block)
    assert not verify_pin(bytes(32), "6222000011112222", "1234", block)
    assert not verify_pin(KEY, "6222000011112222", "\uff11" * 4, block)  # full-width digits


def test_parse_key() -> None:
    assert parse_key("00" * 32) == bytes(32)
    assert parse_key("aB" * 32) == bytes([0xAB]) * 32


@pytest.mark.parametrize(
    "bad",
    ["", "00" * 31, "00" * 33, "zz" * 32, " " + "00" * 31 + "0", "00 " * 21 + "0", "\uff10" * 64],
)
def test_parse_key_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_key(bad)
