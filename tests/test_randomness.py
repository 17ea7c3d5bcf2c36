"""The secure stream's bits and distributions, against an independent ChaCha20 and scipy.

The reference keystream is RFC 8439's ChaCha20 block function written out in Python (checked on
the RFC's own test vector), not the OpenSSL cipher the stream uses; the reference uniforms and
Box-Muller normals are numpy float64 arithmetic on its words, not the stream's bit tricks.
"""

from __future__ import annotations

import copy
import math
import os
import struct

import numpy as np
import pytest
import torch
from scipy import stats

from fahr_core.privacy import randomness
from fahr_core.privacy.chacha import MAX_BLOCKS, SEGMENT_BLOCKS, key_words, keystream_words
from fahr_core.privacy.randomness import SecureStream

MASK32 = 0xFFFFFFFF


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & MASK32


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & MASK32
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & MASK32
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & MASK32
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & MASK32
    s[b] = _rotl(s[b] ^ s[c], 7)


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    """RFC 8439 section 2.3: one 64-byte keystream block."""
    init = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    init += list(struct.unpack("<8I", key)) + [counter] + list(struct.unpack("<3I", nonce))
    s = list(init)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):
            _quarter(s, a, b, c, d)
        for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            _quarter(s, a, b, c, d)
    return struct.pack("<16I", *((x + y) & MASK32 for x, y in zip(s, init, strict=True)))


def stream_block(key: bytes, block: int) -> bytes:
    """Block `block` of the stream: RFC 8439 with counter block mod 2^32 and nonce word block >> 32."""
    return chacha20_block(key, block & MASK32, struct.pack("<3I", block >> 32, 0, 0))


def reference_words(key: bytes, n: int, first_word: int = 0) -> np.ndarray:
    """n 64-bit little-endian words of the stream's keystream from word `first_word` on."""
    first, last = 8 * first_word // 64, math.ceil(8 * (first_word + n) / 64)
    blocks = b"".join(stream_block(key, b) for b in range(first, last))
    start = 8 * first_word - 64 * first
    return np.frombuffer(blocks[start : start + 8 * n], dtype="<u8")


def reference_uniforms(words: np.ndarray) -> np.ndarray:
    return ((words & np.uint64(2**52 - 1)).astype(np.float64) + 0.5) / 2.0**52


def test_python_chacha20_reproduces_the_rfc_8439_test_vector():
    block = chacha20_block(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    assert block.hex() == (
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )


def test_uniforms_are_the_keystream_words_low_52_bits():
    key = os.urandom(32)
    stream = SecureStream(key)
    first, second = stream.random(5), stream.random((2, 3))  # consecutive draws continue the stream
    expected = reference_uniforms(reference_words(key, 11))
    np.testing.assert_array_equal(first, expected[:5])
    np.testing.assert_array_equal(second, expected[5:].reshape(2, 3))


@pytest.mark.parametrize("size", [1, 7, 10, 23])
def test_normals_are_box_muller_on_the_keystream_chunk_by_chunk(size, monkeypatch):
    chunk = 6
    monkeypatch.setattr(randomness, "NORMAL_CHUNK", chunk)  # several chunks, an odd last one
    key = os.urandom(32)
    z = SecureStream(key).normal((size,), std=2.5).numpy()
    pieces, used = [], 0
    for start in range(0, size, chunk):
        m = min(chunk, size - start)
        half = (m + 1) // 2
        u = reference_uniforms(reference_words(key, used + 2 * half)[used:])
        used += 2 * half
        radius = 2.5 * np.sqrt(-2.0 * np.log(u[:half]))
        pieces.append(
            np.concatenate([radius * np.cos(2 * np.pi * u[half:]), radius * np.sin(2 * np.pi * u[half:])])[:m]
        )
    np.testing.assert_allclose(z, np.concatenate(pieces), rtol=1e-13, atol=1e-13)


def test_normals_match_the_gaussian_in_shape_moments_and_tails():
    z = SecureStream(os.urandom(32)).normal((1000, 2001)).numpy().ravel()  # odd: a leftover pair
    n = z.size
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    for cut in (3.0, 4.0):  # the tails, where too few bits per uniform would show first
        expected = n * 2 * stats.norm.sf(cut)
        assert abs(np.sum(np.abs(z) > cut) - expected) < 5 * math.sqrt(expected)


def test_normals_come_scaled_and_cast_where_asked():
    z = SecureStream(os.urandom(32)).normal((300, 400), std=0.25, dtype=torch.float32, device="cpu")
    assert z.shape == (300, 400) and z.dtype == torch.float32
    assert float(z.std()) == pytest.approx(0.25, rel=5 * math.sqrt(1 / (2 * z.numel())))


# across the sign bit of int32 words, and across 2^32 blocks into the counter's high word
@pytest.mark.parametrize("first", [0, 3, 2**31 - 1, 2**32 - 2, 2**40 + 7])
def test_torch_chacha20_blocks_equal_the_reference_blocks(first):
    key = os.urandom(32)
    words = keystream_words(key_words(key), first, 3, "cpu")
    expected = b"".join(stream_block(key, first + i) for i in range(3))
    assert words.dtype == torch.int64
    np.testing.assert_array_equal(words.numpy(), np.frombuffer(expected, dtype="<u4").astype(np.int64))


def test_torch_and_openssl_keystreams_give_the_same_draws_in_any_mix():
    """Whichever maker a draw uses (torch on a GPU, OpenSSL on the CPU), the stream continues exactly."""
    key = os.urandom(32)
    sizes = [5, 3, 17, 1, 9, 2]  # odd sizes: draws end inside a 64-byte block
    mixed = SecureStream(key)
    got = []
    for i, n in enumerate(sizes):
        mixed._keystream = ("torch", "openssl")[i % 2]
        got.append(mixed.random(n))
    expected = reference_uniforms(reference_words(key, sum(sizes)))
    np.testing.assert_array_equal(np.concatenate(got), expected)
    z_torch = SecureStream(key, keystream="torch").normal((7, 11), std=0.5)
    z_openssl = SecureStream(key, keystream="openssl").normal((7, 11), std=0.5)
    assert torch.equal(z_torch, z_openssl)


@pytest.mark.parametrize("keystream", ["openssl", "torch"])
def test_a_stream_runs_past_the_32_bit_block_counter(keystream):
    """ViT-B's full fine-tuning draws 685 MB a step: one call passes RFC 8439's 256 GiB in ~400 steps."""
    key = os.urandom(32)
    stream = SecureStream(key, keystream=keystream)
    start_word = SEGMENT_BLOCKS * 64 // 8 - 3  # three words before the end of block 2^32 - 1
    stream._pos = 8 * start_word
    got = np.concatenate([stream.random(7), stream.random(2)])  # across the boundary, then after it
    np.testing.assert_array_equal(got, reference_uniforms(reference_words(key, 9, start_word)))


def test_a_stream_cannot_be_copied():
    stream = SecureStream(os.urandom(32))
    for copier in (copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="same keystream"):
            copier(stream)


def test_an_exhausted_stream_refuses_instead_of_repeating_its_keystream():
    with pytest.raises(ValueError, match="exhausted"):
        keystream_words(key_words(os.urandom(32)), MAX_BLOCKS - 1, 2, "cpu")
    stream = SecureStream(os.urandom(32), keystream="torch")
    stream._pos = MAX_BLOCKS * 64 - 8  # the last word of the keystream
    stream.random(1)
    with pytest.raises(ValueError, match="exhausted"):
        stream.random(1)


def test_a_stream_names_an_unknown_keystream_maker():
    with pytest.raises(ValueError, match="keystream must be"):
        SecureStream(os.urandom(32), keystream="numpy")  # type: ignore[arg-type]
