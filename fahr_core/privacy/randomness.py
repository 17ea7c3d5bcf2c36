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
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

log = logging.getLogger(__name__)

TEST_RNG_ENV = "FAHR_INSECURE_TEST_RNG"
UNDER_TEST_ENV = "PYTEST_CURRENT_TEST"  # pytest sets it while a test runs
KEY_BYTES = 32
_NONCE = bytes(16)  # each key is used for one stream only, so a fixed nonce is safe
_TWO_POW_53 = float(2**53)


class SecureStream:
    """Uniforms, normals and Bernoulli masks from one ChaCha20 keystream (a CSPRNG for a secret key).

    Floats come from 53-bit integers, so every uniform is an exact float64 in (0, 1); normals use
    Box-Muller in float64 and are cast by the caller.
    """

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a stream key has {KEY_BYTES} bytes, not {len(key)}")
        self._cipher = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    def _uint64(self, n: int) -> np.ndarray:
        return np.frombuffer(self._cipher.update(bytes(8 * n)), dtype="<u8")

    def random(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """Uniforms in the open interval (0, 1) (same call as numpy's Generator.random)."""
        size = int(np.prod(shape))
        return ((self._uint64(size) >> np.uint64(11)).astype(np.float64) + 0.5).reshape(shape) / _TWO_POW_53

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normals (Box-Muller on pairs of uniforms), float64."""
        size = int(np.prod(shape))
        half = (size + 1) // 2
        u = self.random(2 * half)
        radius = np.sqrt(-2.0 * np.log(u[:half]))
        angle = 2.0 * np.pi * u[half:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size].reshape(shape)

    def below(self, k: int) -> int:
        """A uniform integer in [0, k) (bias below 2**-53 * k: far below anything a model could show)."""
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
