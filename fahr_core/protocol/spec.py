"""The model spec: what the server tells every site each round, so all sites build the same model.

It is the server's `[model]` table as the round config carries it, plus the frozen base's hash the
server computed. The table below is the one place that names each setting on the wire; encoding
and decoding both walk it, so a setting cannot be sent under one key and read under another. The
paths of the server's own files (`encoder_checkpoint`, `age_checkpoint`, `init_age_model`) and
the prior that shapes its initial model (`init_log_hr_per_year`) are not in it: they mean nothing
at a site, which receives the initial model's weights and checks its frozen base by hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace

from fahr_core.config import ModelConfig, finetune_problem

# ModelConfig field -> its key in the round config
SPEC_KEYS: dict[str, str] = {
    "arch": "arch",
    "img_size": "img-size",
    "n_intervals": "n-intervals",
    "horizon_years": "horizon-years",
    "finetune": "finetune",
    "lora_rank": "lora-rank",
    "lora_alpha": "lora-alpha",
    "lora_targets": "lora-targets",
    "lora_seed": "lora-seed",
    "wire_dtype": "wire-dtype",
    "base_sha256": "base-sha256",
}
_TYPES = {f.name: type(getattr(ModelConfig(), f.name)) for f in fields(ModelConfig)}  # str, int or float


def spec_to_record(spec: ModelConfig) -> dict[str, str | int | float]:
    """The spec's entries of the round config."""
    return {key: getattr(spec, name) for name, key in SPEC_KEYS.items()}


def spec_from_record(record: Mapping) -> ModelConfig:
    """The spec a site received; ValueError naming the missing key or the invalid setting."""
    try:
        values = {name: _TYPES[name](record[key]) for name, key in SPEC_KEYS.items()}
    except KeyError as e:
        raise ValueError(f"server message lacks model setting {e}") from None
    spec = replace(ModelConfig(), **values)
    problem = finetune_problem(spec)
    if problem:
        raise ValueError(f"server message: {problem}")
    return spec
