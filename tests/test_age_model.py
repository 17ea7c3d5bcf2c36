"""The age model's file format: what is saved is what is loaded, and foreign files are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fahr_core.age.model import AgeViT, load_age_model, save_age_model
from fahr_core.models.checkpoint import save_weights


def test_round_trip_predicts_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AgeViT("vit_micro", 112, mean_age=35.0)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    x = torch.randn(3, 3, 112, 112)
    save_age_model(tmp_path / "age.safetensors", model, {"data": "test"})
    again = load_age_model(tmp_path / "age.safetensors")
    assert again.arch == "vit_micro"
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_refuses_a_survival_checkpoint(tmp_path: Path) -> None:
    save_weights(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"arch": "vit_micro"})
    with pytest.raises(ValueError, match="other.safetensors: not a fahr age model"):
        load_age_model(tmp_path / "other.safetensors")
