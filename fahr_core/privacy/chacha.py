"""ChaCha20 keystream blocks (RFC 8439) computed by torch on the device that will use them.

Why: a site training on a GPU draws tens of millions of noise coordinates per step. OpenSSL makes
the keystream on one CPU core (about 0.4 s per step for ViT-B's 86 M parameters on the reference
VM, docs/performance.md), several times the step itself, and the bytes must then cross to the
device. The block function is only additions, rotations and xors of 32-bit words, so torch runs
it for every block of a draw at once, on the GPU, and `SecureStream` gets the same bits as from
OpenSSL's cipher (the tests compare both, and both with RFC 8439's vector).

Words live in int64 and are masked to 32 bits after each addition and shift: int32 overflow is
undefined behaviour in C++, so wrapping int32 arithmetic would be correct only by accident.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

BLOCK_BYTES = 64
# The block counter is 64 bits, words 12 and 13 (ChaCha20's original layout; words 14-15, the
# nonce, stay zero). RFC 8439's counter is word 12 alone: 2^32 blocks, 256 GiB, which full
# fine-tuning of ViT-B (685 MB of keystream per step) would exhaust after ~400 steps of one
# training call. Block b is RFC 8439's block with counter b mod 2^32 and nonce word b >> 32, so
# OpenSSL makes any block too. The end below (int64's arange) is never reached.
MAX_BLOCKS = 1 << 62
SEGMENT_BLOCKS = 1 << 32  # blocks per value of word 13: what one OpenSSL cipher object can make
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_M32 = 0xFFFFFFFF


def _rotl(x: torch.Tensor, n: int) -> torch.Tensor:
    return ((x << n) & _M32) | (x >> (32 - n))


def _quarter(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RFC 8439's quarter round on four rows of words at once (each (4, blocks))."""
    a = (a + b) & _M32
    d = _rotl(d ^ a, 16)
    c = (c + d) & _M32
    b = _rotl(b ^ c, 12)
    a = (a + b) & _M32
    d = _rotl(d ^ a, 8)
    c = (c + d) & _M32
    b = _rotl(b ^ c, 7)
    return a, b, c, d


def _block_function(state: torch.Tensor) -> torch.Tensor:
    """20 rounds over a (16, blocks) state; the (16, blocks) keystream words.

    A column round is the quarter round on rows 0-3, 4-7, 8-11, 12-15; a diagonal round is the
    same after rotating the second, third and fourth row groups by 1, 2 and 3 (rows 5,6,7,4 /
    10,11,8,9 / 15,12,13,14 line up under 0,1,2,3), undone afterwards.
    """
    a, b, c, d = state[0:4], state[4:8], state[8:12], state[12:16]
    for _ in range(10):
        a, b, c, d = _quarter(a, b, c, d)
        a, b, c, d = _quarter(a, b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0))
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    return (torch.cat([a, b, c, d]) + state) & _M32


_compiled: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def _kernel(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block function, fused into one kernel by torch.compile on a GPU (eager elsewhere).

    Eager, every one of the ~300 row operations is a pass over memory; fused, the state stays in
    registers. The compiled kernel is used only after it reproduced the eager function (which
    the tests check against RFC 8439) on random states; if compilation fails or differs, the eager
    function gives the same bits, slower.
    """
    if device.type != "cuda":
        return _block_function
    if "cuda" not in _compiled:
        _compiled["cuda"] = _block_function
        # random states with every bit pattern, 37 blocks (not a multiple of any vector width)
        probe = torch.randint(0, 1 << 32, (16, 37), dtype=torch.int64, device=device)
        try:
            fn = torch.compile(_block_function, dynamic=True)
            same = torch.equal(fn(probe), _block_function(probe))
        except Exception as e:  # noqa: BLE001 - any compiler failure leaves the exact eager path
            log.warning("torch.compile of the ChaCha20 block function failed (%s); using eager torch", e)
        else:
            if same:  # the compiled kernel must give the eager function's bits, or it is not used
                _compiled["cuda"] = fn
            else:
                log.warning("compiled ChaCha20 blocks differ from the eager ones; using eager torch")
    return _compiled["cuda"]


def check_blocks(first_block: int, blocks: int) -> None:
    """Refuse blocks past the counter's end: wrapping it would repeat the keystream, and the noise."""
    if first_block + blocks > MAX_BLOCKS:
        raise ValueError(
            "ChaCha20 stream exhausted: the block counter would overflow; draw from a fresh stream"
        )


def key_words(key: bytes) -> tuple[int, ...]:
    """The key's eight little-endian 32-bit words."""
    return tuple(int.from_bytes(key[i : i + 4], "little") for i in range(0, 32, 4))


def keystream_words(
    key: tuple[int, ...], first_block: int, blocks: int, device: torch.device | str
) -> torch.Tensor:
    """The 32-bit words (int64, flat, in stream order) of `blocks` blocks from block `first_block`.

    The block counter in words 12 (low) and 13 (high), nonce words zero (see MAX_BLOCKS).
    """
    check_blocks(first_block, blocks)
    device = torch.device(device)
    counter = torch.arange(first_block, first_block + blocks, dtype=torch.int64, device=device)
    state = torch.zeros(16, blocks, dtype=torch.int64, device=device)
    state[0:4] = torch.tensor(_SIGMA, dtype=torch.int64, device=device)[:, None]
    state[4:12] = torch.tensor(key, dtype=torch.int64, device=device)[:, None]
    state[12] = counter & _M32
    state[13] = counter >> 32
    return _kernel(device)(state).t().reshape(-1)


def openssl_nonce(block: int) -> bytes:
    """The 16 bytes OpenSSL's ChaCha20 takes to start at `block`: counter word, then nonce words."""
    return (block & _M32).to_bytes(4, "little") + (block >> 32).to_bytes(4, "little") + bytes(8)
