"""Fine-tuning modes, and the split of the model into what travels and the frozen base.

The server's [model] table chooses the mode and it reaches every site in the model spec, so all
sites train the same tensors (the federation averages them by name). Only the trainable tensors
travel, in both directions: under DP the noise grows with the number of trained parameters, and a
LoRA adapter of a ViT-B is a few hundred kB where the model is 343 MB.

Where a site's frozen base comes from: the server sends the whole model (base and trainable
tensors) in the first round of each server process (a fresh run, or a resumed one), and in every
round when only a fraction of the sites is sampled (a site may then be asked for the first time
later). The site keeps the base in its workdir. In every round the spec carries the base's
sha256, and the site checks its copy against it before training or evaluating, refusing a
mismatch: a site never trains an adapter on a different encoder than the federation's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fahr_core.config import LORA_TARGETS, ModelConfig
from fahr_core.models.checkpoint import load_weights, save_weights
from fahr_core.models.lora import LoRALinear
from fahr_core.models.vit import SurvivalViT

State = dict[str, torch.Tensor]
_TARGET_PARENT = {"qkv": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp"}
_WIRE = {"float16": torch.float16, "bfloat16": torch.bfloat16}
M = TypeVar("M", bound=nn.Module)


class BaseMismatch(RuntimeError):
    """The frozen base a site holds (or was sent) is not the one the federation's spec names."""


def prepare(model: SurvivalViT, spec: ModelConfig) -> SurvivalViT:
    """Set what trains for `spec.finetune` (in place), adding LoRA adapters for the LoRA modes.

    The survival head always trains (it is new, or folded from an age model that knows nothing of
    survival). The position table and class token never do:
    they sit on timm's root module, where a trainable tensor sends the whole model through
    Opacus' functorch fallback (see fahr_core.models.vit).
    """
    enc, mode = model.encoder, spec.finetune
    enc.requires_grad_(mode == "full")
    model.head.requires_grad_(True)
    if mode.startswith("last:"):
        for block in list(enc.blocks)[-int(mode[5:]) :]:
            block.requires_grad_(True)
        enc.norm.requires_grad_(True)
        enc.fc_norm.requires_grad_(True)  # the pooled features' norm sits after the last block
    if mode in ("lora", "ffa-lora"):
        wanted = set(spec.lora_targets.split(","))
        generator = torch.Generator().manual_seed(spec.lora_seed)
        for block in enc.blocks:  # fixed order: the same A at every site for the same spec
            for target in (t for t in LORA_TARGETS if t in wanted):
                parent = getattr(block, _TARGET_PARENT[target])
                adapter = LoRALinear(getattr(parent, target), spec.lora_rank, spec.lora_alpha, generator)
                adapter.lora_A.requires_grad_(mode == "lora")
                setattr(parent, target, adapter)
    # timm types both as Optional; fahr_core.models.vit builds the encoder with both
    assert enc.pos_embed is not None and enc.cls_token is not None
    enc.pos_embed.requires_grad_(False)
    enc.cls_token.requires_grad_(False)
    return model


def build(spec: ModelConfig) -> SurvivalViT:
    """The model a site trains for `spec`, before any weights are loaded into it."""
    return prepare(SurvivalViT(spec.arch, spec.img_size, spec.n_intervals), spec)


def split_state(model: nn.Module) -> tuple[State, State]:
    """(trainable tensors, frozen base): the state dict split by requires_grad, detached copies."""
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if k in train}, {k: v for k, v in state.items() if k not in train}


def base_sha256(frozen: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the frozen tensors' names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(frozen):
        t = frozen[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def to_wire(state: Mapping[str, torch.Tensor], dtype: str) -> State:
    """Trainable tensors as they travel. bfloat16 travels as its int16 bit pattern: numpy, which
    Flower's arrays are, has no bfloat16."""
    if dtype == "float32":
        return dict(state)
    cast = {k: v.to(_WIRE[dtype]) for k, v in state.items()}
    return {k: v.view(torch.int16) for k, v in cast.items()} if dtype == "bfloat16" else cast


def from_wire(state: Mapping[str, torch.Tensor], dtype: str) -> State:
    """Back to float32. A tensor not in the wire's representation is left as it is, so the shape
    and dtype checks against the global model (weights_mismatch) still catch it."""
    wire = torch.int16 if dtype == "bfloat16" else _WIRE.get(dtype)
    out = {}
    for k, v in state.items():
        if v.dtype == wire:
            v = (v.view(torch.bfloat16) if dtype == "bfloat16" else v).float()
        out[k] = v
    return out


def _site_base(received: State, spec: ModelConfig, path: Path) -> State:
    """The frozen base to train on: the one just received (kept for later rounds) or the kept one,
    either way only if it hashes to the spec's."""
    if received:
        got = base_sha256(received)
        if got != spec.base_sha256:
            raise BaseMismatch(
                f"the frozen base the server sent hashes to {got}, but its model spec names "
                f"{spec.base_sha256}; refusing the round"
            )
        save_weights(path, received, {"sha256": got})
        return received
    if not path.is_file():
        raise BaseMismatch(
            f"{path}: this site holds no frozen base; the server sends it in the first round of its "
            "run, which this site missed. Restart the server with --resume to send it again"
        )
    kept = load_weights(path)
    got = base_sha256(kept)
    if got != spec.base_sha256:
        raise BaseMismatch(
            f"{path}: this site's frozen base (sha256 {got}) differs from the federation's "
            f"({spec.base_sha256}); refusing to train or evaluate another model"
        )
    return kept


def site_model(received: Mapping[str, torch.Tensor], spec: ModelConfig, base_path: Path) -> SurvivalViT:
    """The model a site trains or evaluates: the checked frozen base plus the received trainable tensors."""
    model = build(spec)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(names - set(received))
    if missing:
        raise ValueError(f"the server sent no {missing[:3]} (of {len(missing)} trainable tensors missing)")
    base = {k: v for k, v in received.items() if k not in names}
    frozen = _site_base(base, spec, Path(base_path))
    trainable = from_wire({k: received[k] for k in names}, spec.wire_dtype)
    model.load_state_dict({**frozen, **trainable}, strict=True)
    return model


def trainable_part(received: Mapping[str, torch.Tensor], spec: ModelConfig) -> State:
    """The received tensors that are trained (and sent back) under `spec`; the rest is the base."""
    names = {n for n, p in build(spec).named_parameters() if p.requires_grad}
    return {k: v for k, v in received.items() if k in names}


@torch.no_grad()
def merge(model: M) -> M:
    """Fold every LoRA adapter into its Linear (in place): a plain ViT for inference and reports."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.merged())
    return model


def plain_state(state: Mapping[str, torch.Tensor], spec: ModelConfig) -> State:
    """A full (unmerged) state of `spec`'s model as a plain SurvivalViT state dict."""
    model = build(spec)
    model.load_state_dict(dict(state), strict=True)
    return merge(model).state_dict()


@dataclass(frozen=True)
class GlobalModel:
    """What the server holds besides the trainable tensors it averages: the spec and the frozen base."""

    spec: ModelConfig  # with base_sha256 set
    base: State

    @classmethod
    def start(cls, model: SurvivalViT, spec: ModelConfig) -> tuple[GlobalModel, State]:
        """From a prepared model: the global model and its trainable tensors (the first global update)."""
        trainable, base = split_state(model)
        return cls(replace(spec, base_sha256=base_sha256(base)), base), trainable

    def outgoing(self, trainable: Mapping[str, torch.Tensor], with_base: bool) -> State:
        """What the server sends a site: the trainable tensors in the wire dtype, and maybe the base."""
        return {**(self.base if with_base else {}), **to_wire(trainable, self.spec.wire_dtype)}

    def full(self, trainable: Mapping[str, torch.Tensor]) -> State:
        """Base and trainable tensors together: a round's checkpoint, from which a run can resume."""
        return {**self.base, **trainable}

    def plain(self, trainable: Mapping[str, torch.Tensor]) -> State:
        """The global model as a plain SurvivalViT (LoRA merged), for inference and reports."""
        return plain_state(self.full(trainable), self.spec)
