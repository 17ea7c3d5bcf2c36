"""The site's outbound audit log and the ClientApp's version gate."""

from __future__ import annotations

import json

import pytest
import torch

from fahr_client.app import VersionMismatch, round_info
from fahr_core.config import ModelConfig
from fahr_core.privacy.audit import append_audit, verify_audit_log
from fahr_core.release import fahr_version


def test_audit_log_records_every_tensor_and_detects_tampering(tmp_path):
    path = tmp_path / "audit.jsonl"
    w = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    append_audit(path, "train", 1, 7, w, {"num-examples": 10})
    append_audit(path, "evaluate", 1, 7, {}, {"c-index": 0.7})
    assert verify_audit_log(path) == 2
    first = json.loads(path.read_text().splitlines()[0])
    assert first["tensors"] == [
        {
            "name": "w",
            "shape": [2, 3],
            "dtype": "float32",
            "bytes": 24,
            "sha256": __import__("hashlib").sha256(w["w"].numpy().tobytes()).hexdigest(),
        }
    ]
    lines = path.read_text().splitlines()
    path.write_text(lines[0].replace('"num-examples": 10', '"num-examples": 11') + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 2: chain broken"):
        verify_audit_log(path)


def test_client_refuses_a_server_running_another_fahr_version():
    config = {**ModelConfig(arch="vit_micro").to_record(), "server-round": 1, "num-rounds": 2}
    spec, rnd, total = round_info({**config, "fahr-version": fahr_version()})
    assert spec.arch == "vit_micro" and (rnd, total) == (1, 2)
    with pytest.raises(VersionMismatch, match="server runs fahr 0.0.1"):
        round_info({**config, "fahr-version": "0.0.1"})
