"""The site's outbound audit log and the ClientApp's version gate."""

from __future__ import annotations

import json

import pytest
import torch

from fahr_client.app import VersionMismatch, round_info
from fahr_core.config import ModelConfig
from fahr_core.privacy.audit import AuditLogTampered, append_audit, head_path, verify_audit_log
from fahr_core.protocol.spec import spec_to_record
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


def _three_records(path):
    for rnd in (1, 2, 3):
        append_audit(path, "train", rnd, 7, {"w": torch.full((2,), float(rnd))}, {"num-examples": 10})
    assert verify_audit_log(path) == 3
    return path.read_bytes().splitlines(keepends=True)


def test_editing_the_last_line_is_detected_and_stops_further_sends(tmp_path):
    path = tmp_path / "audit.jsonl"
    lines = _three_records(path)
    path.write_bytes(b"".join(lines[:2]) + lines[2].replace(b'"num-examples": 10', b'"num-examples": 11'))
    with pytest.raises(AuditLogTampered, match="last record differs from the head"):
        verify_audit_log(path)
    with pytest.raises(AuditLogTampered):  # nothing more is appended to a tampered log
        append_audit(path, "train", 4, 7, {}, {"num-examples": 10})
    assert len(path.read_bytes().splitlines()) == 3


@pytest.mark.parametrize("keep", [2, 0])
def test_deleting_lines_from_the_end_is_detected(tmp_path, keep):
    path = tmp_path / "audit.jsonl"
    lines = _three_records(path)
    path.write_bytes(b"".join(lines[:keep]))
    with pytest.raises(AuditLogTampered, match=f"{3 - keep} record\\(s\\) removed from its end"):
        verify_audit_log(path)


def test_deleting_the_head_or_the_log_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _three_records(path)
    head = head_path(path).read_bytes()
    head_path(path).unlink()
    with pytest.raises(AuditLogTampered, match="head"):
        verify_audit_log(path)
    head_path(path).write_bytes(head)
    path.unlink()
    with pytest.raises(AuditLogTampered, match="3 record"):
        verify_audit_log(path)


def test_a_crash_between_the_append_and_the_head_is_recovered(tmp_path):
    path = tmp_path / "audit.jsonl"
    _three_records(path)
    head = head_path(path).read_bytes()
    append_audit(path, "evaluate", 3, 7, {}, {"epsilon": 1.0})
    head_path(path).write_bytes(head)  # as if the site died before replacing the head
    assert verify_audit_log(path) == 4
    append_audit(path, "train", 1, 8, {}, {"epsilon": 1.0})
    assert verify_audit_log(path) == 5


def test_client_refuses_a_server_running_another_fahr_version():
    config = {**spec_to_record(ModelConfig(arch="vit_micro")), "server-round": 1, "num-rounds": 2}
    spec, rnd, total = round_info({**config, "fahr-version": fahr_version()})
    assert spec.arch == "vit_micro" and (rnd, total) == (1, 2)
    with pytest.raises(VersionMismatch, match="server runs fahr 0.0.1"):
        round_info({**config, "fahr-version": "0.0.1"})
