"""Cryptographically secure randomness for everything DP depends on at a site.

DP-SGD is private only if the site's random draws (which patients each step samples, the
Gaussian noise, secure aggregation's stochastic rounding) are unpredictable to whoever sees its
updates. A seed derivable from configuration or from the server's round number lets anyone replay
the noise and subtract it. So every training call keys a fresh ChaCha20 keystream with 32 bytes
from os.urandom; nothing in a site's config or in what the server sends enters the key.

Tests that must reproduce a site's training bit for bit set FAHR_INSECURE_TEST_RNG to an integer:
the key is then derived from that integer, a loud warning is logged, and the privacy ledger
records the round as trained with test randomness. The switch works only inside a pytest run
(PYTEST_CURRENT_TEST is in the environment; processes a test starts inherit it): anywhere else a
set switch makes every draw raise, so a hand-started SuperNode or a unit file carrying the variable
refuses to train instead of training with reproducible noise. `fahr-client start` also refuses to
join a federation with it set unless it runs `--insecure` on loopback (test mode).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fahr_core.privacy.chacha import (
    BLOCK_BYTES,
    SEGMENT_BLOCKS,
    check_blocks,
    key_words,
    keystream_words,
    openssl_nonce,
)

log = logging.getLogger(__name__)

TEST_RNG_ENV = "FAHR_INSECURE_TEST_RNG"
UNDER_TEST_ENV = "PYTEST_CURRENT_TEST"  # pytest sets it while a test runs
KEY_BYTES = 32
_MANTISSA = 2**52 - 1  # the low 52 bits of a float64
_ONE_BITS = 0x3FF0000000000000  # the sign and exponent bits of 1.0
NORMAL_CHUNK = 1 << 22  # normals per keystream chunk: 32 MiB of keystream, whatever the tensor's size
Keystream = Literal["openssl", "torch"]


class SecureStream:
    """Uniforms, normals and Bernoulli masks from one ChaCha20 keystream (a CSPRNG for a secret key).

    Every uniform takes one 64-bit keystream word, of which the low 52 bits make an exact float64
    in (0, 1) (smallest 2**-53, so Box-Muller normals reach 8.6 sigma: the tails are Gaussian
    well beyond anything millions of coordinates per step for thousands of steps ever draw).
    Normals are Box-Muller in float64 done by torch on the device that will use them. For the CPU,
    OpenSSL writes the keystream in chunks straight into a buffer torch reads without a copy; for
    a GPU, torch makes the same keystream there (`fahr_core.privacy.chacha`); either way only the
    transform (log, sqrt, cos, sin) runs per coordinate. numpy's float64 Box-Muller on one
    core took ~75 ms per million normals, seconds per step for a ViT-B; see docs/performance.md.
    """

    def __init__(self, key: bytes, keystream: Keystream | None = None):
        """`keystream` says who makes the bits: OpenSSL on the CPU or torch (`fahr_core.privacy.chacha`)
        on the device of each draw. The default picks torch for draws onto an accelerator and
        OpenSSL for the CPU; both give the same bits, so only speed depends on the choice.
        """
        if len(key) != KEY_BYTES:
            raise ValueError(f"a stream key has {KEY_BYTES} bytes, not {len(key)}")
        if keystream not in (None, "openssl", "torch"):
            raise ValueError(f"keystream must be 'openssl' or 'torch', got {keystream!r}")
        self._key = key
        self._key_words = key_words(key)
        self._keystream = keystream
        self._pos = 0  # keystream bytes used so far, by either maker
        self._cipher = self._cipher_at(0)
        self._cipher_pos = 0  # where the OpenSSL cipher stands (behind _pos after a torch draw)

    def __copy__(self) -> SecureStream:
        raise TypeError("a SecureStream cannot be copied: two copies would draw the same keystream")

    def __deepcopy__(self, memo: dict) -> SecureStream:
        raise TypeError("a SecureStream cannot be copied: two copies would draw the same keystream")

    def _cipher_at(self, pos: int) -> Any:
        """An OpenSSL ChaCha20 encryptor positioned at keystream byte `pos` (block pos // 64)."""
        block, skip = divmod(pos, BLOCK_BYTES)
        check_blocks(block, 1)
        cipher = Cipher(algorithms.ChaCha20(self._key, openssl_nonce(block)), mode=None)
        encryptor = cipher.encryptor()
        encryptor.update(bytes(skip))
        return encryptor

    def _openssl_bytes(self, size: int) -> bytearray:
        """The next `size` keystream bytes from OpenSSL (plus one block of slack at the end).

        One OpenSSL cipher runs only to the end of its 2^32-block segment (its counter is 32 bits),
        so a draw that crosses a segment's end continues with a cipher for the next one.
        """
        out = bytearray(size + BLOCK_BYTES)  # update_into wants room for one more block
        view, done = memoryview(out), 0
        while done < size:
            pos = self._pos + done
            if self._cipher_pos != pos:
                self._cipher = self._cipher_at(pos)
            segment_end = (pos // (SEGMENT_BLOCKS * BLOCK_BYTES) + 1) * SEGMENT_BLOCKS * BLOCK_BYTES
            take = min(size - done, segment_end - pos)
            self._cipher.update_into(bytes(take), view[done : done + take + BLOCK_BYTES])
            done += take
            # a cipher that reached its segment's end is spent: the next byte needs a new one
            self._cipher_pos = pos + take if pos + take < segment_end else -1
        return out

    def _mantissas(self, n: int, device: torch.device | str | None) -> torch.Tensor:
        """The low 52 bits of the next n 64-bit keystream words (little-endian), int64 on `device`."""
        n = int(n)  # a numpy integer would leak into the cipher's counter arithmetic
        where = torch.device(device if device is not None else "cpu")
        keystream = self._keystream or ("openssl" if where.type == "cpu" else "torch")
        if keystream == "openssl":
            out = self._openssl_bytes(8 * n)
            bits = torch.frombuffer(out, dtype=torch.int64, count=n).to(where).bitwise_and_(_MANTISSA)
        else:
            first, offset = divmod(self._pos, BLOCK_BYTES)
            words = keystream_words(self._key_words, first, -(-(offset + 8 * n) // BLOCK_BYTES), where)
            start = offset // 4  # draws take whole 64-bit words, so the offset is a multiple of 8
            low, high = words[start : start + 2 * n : 2], words[start + 1 : start + 2 * n : 2]
            bits = low | ((high & (_MANTISSA >> 32)) << 32)
        self._pos += 8 * n
        return bits

    def _uniforms(self, n: int, device: torch.device | str | None) -> torch.Tensor:
        """n float64 uniforms (k + 1/2) / 2**52, k = the low 52 bits of a keystream word.

        The bits become the mantissa of a float in [1, 2) (exponent bits set, no integer-to-float
        conversion, which torch does slowly on the CPU); subtracting 1 - 2**-53 is exact, so u is
        one of 2**52 equally likely values, all in the open interval (0, 1), the smallest 2**-53.
        """
        bits = self._mantissas(n, device).bitwise_or_(_ONE_BITS)
        return bits.view(torch.float64).sub_(1.0 - 2.0**-53)

    def random(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """Uniforms in the open interval (0, 1) (same call as numpy's Generator.random)."""
        return self._uniforms(math.prod(np.atleast_1d(shape)), None).numpy().reshape(shape)

    def normal(
        self,
        shape: tuple[int, ...],
        *,
        std: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """Normals N(0, std^2) of `shape` on `device`: computed in float64, then cast to `dtype`.

        Chunk by chunk of NORMAL_CHUNK (the last one shorter): 2 ceil(m/2) words, the first half
        radii sqrt(-2 log u), the second half angles 2 pi u; the chunk is the ceil(m/2) cosines then
        the first floor(m/2) sines. The chunking bounds host memory; tests rebuild this layout
        from an RFC 8439 ChaCha20 written in Python.
        """
        size = math.prod(shape)
        out = torch.empty(size, dtype=dtype, device=device)
        for start in range(0, size, NORMAL_CHUNK):
            m = min(NORMAL_CHUNK, size - start)
            half = (m + 1) // 2
            u = self._uniforms(2 * half, device)
            radius = u[:half].log_().mul_(-2.0).sqrt_().mul_(std)
            angle = u[half:].mul_(2.0 * math.pi)
            torch.mul(radius, angle.cos(), out=out[start : start + half])  # cast to dtype on write
            torch.mul(radius[: m - half], angle[: m - half].sin_(), out=out[start + half : start + m])
        return out.view(shape)

    def below(self, k: int) -> int:
        """A uniform integer in [0, k) (bias below 2**-52 * k: far below anything a model could show)."""
        return min(int(self.random(1)[0] * k), k - 1)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """n independent booleans, each True with probability p."""
        return self.random(n) < p


def _test_seed() -> str | None:
    value = os.environ.get(TEST_RNG_ENV)
    if value is None:
        return None
    if not value.strip().lstrip("-").isdigit():
        raise ValueError(f"{TEST_RNG_ENV}={value!r}: expected an integer seed")
    return value.strip()


def insecure_rng_active() -> bool:
    """Whether this process runs with reproducible (insecure) test randomness."""
    return _test_seed() is not None


def fresh_stream(purpose: str) -> SecureStream:
    """A new secret stream for `purpose` (keyed from os.urandom), or the test stream under the switch.

    `purpose` separates the streams of one call (sampling, noise, photos) when the test switch
    derives them all from one seed; with os.urandom every stream has its own key anyway.
    """
    seed = _test_seed()
    if seed is None:
        return SecureStream(os.urandom(KEY_BYTES))
    if UNDER_TEST_ENV not in os.environ:
        raise RuntimeError(
            f"{TEST_RNG_ENV} is set outside a test run: it would make DP noise reproducible; refusing to "
            f"draw DP randomness. Unset {TEST_RNG_ENV} (it works only under pytest)"
        )
    log.warning(
        "%s is set: DP randomness for %r is REPRODUCIBLE and offers NO privacy (tests only)",
        TEST_RNG_ENV,
        purpose,
    )
    return SecureStream(hashlib.sha256(f"fahr insecure test rng|{seed}|{purpose}".encode()).digest())


def refuse_test_rng(reason: str) -> None:
    """Raise if the test switch is set where real patients' privacy is at stake (`reason` says where)."""
    if insecure_rng_active():
        raise RuntimeError(
            f"{TEST_RNG_ENV} is set, which makes DP noise reproducible; refusing {reason}. "
            f"Unset it: it is for --insecure loopback tests only"
        )
