"""How the federation's one age model reaches every site, byte for byte.

A face-age deviation only compares across sites if every site used the same age model, so the server
names one ([model].age_checkpoint) and sends the file itself with the final evaluation, as a byte array
(Flower carries arrays), with its SHA-256 in the message's config (fahr_core.protocol.keys: AGE_MODEL,
AGE_MODEL_SHA256). A site checks the digest, keeps the file in its workdir and records the digest in
its report: it equals `sha256sum` of the server's file, so anyone can tell which model produced a
site's FAD numbers. The file is sent rather than rebuilt from tensors because safetensors writes its
metadata in no fixed order: the same model would hash differently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fahr_core.age.model import AgeViT, load_age_model
from fahr_core.io import atomic_write_bytes


@dataclass(frozen=True)
class DeliveredAgeModel:
    """An age model as a site received it: the model and the SHA-256 of its file."""

    model: AgeViT
    sha256: str

    def describe(self) -> dict[str, str | int]:
        """What a report records about the age model (no weights)."""
        return {"sha256": self.sha256, "arch": self.model.arch, "img_size": self.model.img_size}


def age_model_payload(path: Path) -> tuple[np.ndarray, str]:
    """Server side: the file's bytes (uint8) and their SHA-256, after checking it loads as an age model.

    Checking here makes a wrong file fail once, at the server, naming the file, instead of at every site.
    """
    path = Path(path)
    load_age_model(path)
    data = path.read_bytes()
    return np.frombuffer(data, dtype=np.uint8), hashlib.sha256(data).hexdigest()


def receive_age_model(payload: np.ndarray, sha256: str, dest: Path) -> DeliveredAgeModel:
    """Site side: check the bytes against the digest the server sent, keep them at `dest`, load the model."""
    data = np.asarray(payload, dtype=np.uint8).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"the age model received ({len(data)} bytes, sha256 {digest}) is not the one the server sent "
            f"(sha256 {sha256}); refusing to compute face-age deviations with it"
        )
    atomic_write_bytes(Path(dest), data)
    return DeliveredAgeModel(load_age_model(dest), digest)
