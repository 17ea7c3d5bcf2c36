"""Fine-tuning modes: what trains, what travels, the frozen base's check, LoRA under Opacus."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from opacus import GradSampleModule
from opacus.utils.module_utils import trainable_modules

from fahr_core.cohort import demo_faces_dir
from fahr_core.config import ConfigError, ModelConfig, server_config_from_dict
from fahr_core.faces.images import load_faces, to_input
from fahr_core.models.checkpoint import load_weights, save_weights
from fahr_core.models.finetune import (
    BaseMismatch,
    GlobalModel,
    build,
    from_wire,
    merge,
    prepare,
    site_model,
    split_state,
    to_wire,
    trainable_part,
)
from fahr_core.models.lora import LoRALinear
from fahr_core.models.vit import SurvivalViT
from fahr_core.protocol.outbound import OutboundViolation, check_outbound
from fahr_core.protocol.spec import spec_from_record, spec_to_record
from fahr_core.survival.losses import discrete_hazard_nll
from fahr_core.workdir import ServerWorkdir, SiteWorkdir

SPEC = ModelConfig(arch="vit_micro")
MODES = ("full", "head", "last:1", "lora", "ffa-lora")


def _faces(n: int) -> torch.Tensor:
    paths = sorted((demo_faces_dir() / "images").iterdir())[:n]
    return to_input(load_faces(paths, 112))


def _start(spec: ModelConfig, seed: int = 0) -> tuple[GlobalModel, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return GlobalModel.start(build(spec), spec)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_the_head_never_cls_pos_and_no_module_falls_back_to_functorch(mode):
    model = build(replace(SPEC, finetune=mode))
    trainable, frozen = split_state(model)
    assert {"head.risk.weight", "head.baseline.weight"} <= set(trainable)
    assert {"encoder.cls_token", "encoder.pos_embed"} <= set(frozen)
    fallback = [n for n, m in trainable_modules(model) if type(m) not in GradSampleModule.GRAD_SAMPLERS]
    assert fallback == []
    if mode == "last:1":
        assert any(k.startswith("encoder.blocks.3.") for k in trainable)
        assert not any(k.startswith("encoder.blocks.2.") for k in trainable)
    if mode.endswith("lora"):
        assert all("lora_" in k or k.startswith("head.") for k in trainable)
        assert any(k.endswith("attn.qkv.lora_B.weight") for k in trainable)
        assert any(k.endswith("attn.proj.lora_B.weight") for k in trainable)
        assert not any("mlp" in k for k in trainable)
        assert any(k.endswith("lora_A.weight") for k in trainable) == (mode == "lora")


def test_adapters_travel_at_a_fiftieth_of_the_full_model():
    def nbytes(spec: ModelConfig) -> int:
        return sum(v.nbytes for v in to_wire(_start(spec)[1], spec.wire_dtype).values())

    full = nbytes(SPEC)
    lora = replace(SPEC, finetune="lora")
    assert full > 50 * nbytes(replace(lora, lora_rank=4))
    # FFA-LoRA sends B only (A is 1/4 of this adapter's parameters); bfloat16 halves the rest again
    assert nbytes(lora) > 2.5 * nbytes(replace(lora, finetune="ffa-lora", wire_dtype="bfloat16"))


def test_ffa_lora_shares_a_across_sites_from_the_spec_seed_not_the_torch_seed():
    spec = replace(SPEC, finetune="ffa-lora", lora_seed=7)
    a1 = {k: v for k, v in _start(spec, seed=1)[0].base.items() if "lora_A" in k}
    a2 = {k: v for k, v in _start(spec, seed=2)[0].base.items() if "lora_A" in k}
    other = {k: v for k, v in _start(replace(spec, lora_seed=8), seed=1)[0].base.items() if "lora_A" in k}
    assert len(a1) == 8 and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert not any(torch.equal(a1[k], other[k]) for k in a1)
    assert all(a1[k].abs().max() > 0 for k in a1)


def test_merged_lora_model_is_a_plain_vit_computing_the_same_risk():
    spec = replace(SPEC, finetune="lora", lora_targets="qkv,proj,fc1,fc2")
    torch.manual_seed(0)
    model = build(spec)
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        model.head.risk.weight.normal_(0, 0.5)  # the zero-initialised head scores everyone 0
        for m in adapters:
            m.lora_B.weight.normal_(0, 0.05)  # B = 0 would make merging trivially right
    x = _faces(6)
    before = model.risk(x)
    plain = SurvivalViT(spec.arch)
    plain.load_state_dict(merge(copy.deepcopy(model)).state_dict(), strict=True)
    assert torch.allclose(plain.risk(x), before, atol=1e-5)
    with torch.no_grad():
        for m in adapters:
            m.lora_B.weight.zero_()
    assert not torch.allclose(model.risk(x), before, atol=1e-3)  # the adapters do change the risk


@pytest.mark.parametrize("mode", ["full", "lora", "ffa-lora"])
def test_opacus_per_sample_gradients_match_a_per_patient_loop(mode):
    """Opacus' own hooks against one backward pass per patient, on real faces (train_dp's
    `PerPatientGradients` is checked the same way in tests/test_ghost_clipping.py)."""
    spec = replace(SPEC, finetune=mode)
    torch.manual_seed(0)
    model = build(spec)
    with torch.no_grad():  # with a zero risk weight or B = 0, most gradients would be zero
        model.head.risk.weight.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
    x = _faces(5)
    t = torch.tensor([1.0, 3.5, 7.0, 12.0, 0.5])
    e = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loop = {n: [] for n in params}
    for i in range(len(x)):
        model.zero_grad()
        eta, alpha = model(x[i : i + 1])
        discrete_hazard_nll(eta, alpha, t[i : i + 1], e[i : i + 1], 10.0).backward()
        for n, p in params.items():
            loop[n].append(p.grad.detach().clone())
    gsm = GradSampleModule(model, loss_reduction="sum")
    model.zero_grad()
    eta, alpha = gsm(x)
    discrete_hazard_nll(eta, alpha, t, e, 10.0, reduction="sum").backward()
    for n, p in params.items():
        want = torch.stack(loop[n])
        assert p.grad_sample.shape == want.shape, n
        assert torch.allclose(p.grad_sample, want, atol=1e-5, rtol=1e-3), n
    assert any("lora_" in n for n in params) == mode.endswith("lora")
    assert all(torch.stack(loop[n]).abs().max() > 0 for n in params)  # not trivially equal zeros
    gsm.cleanup()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_wire_dtypes_round_trip_within_their_precision(dtype):
    _, trainable = _start(replace(SPEC, finetune="lora"))
    trainable = {k: v + 0.01 * torch.randn_like(v) for k, v in trainable.items()}
    wire = to_wire(trainable, dtype)
    assert all(v.dtype == (torch.int16 if dtype == "bfloat16" else torch.float16) for v in wire.values())
    back = from_wire(wire, dtype)
    eps = torch.finfo(getattr(torch, dtype)).eps
    for k, v in trainable.items():
        assert back[k].dtype == torch.float32
        assert torch.allclose(back[k], v, rtol=eps, atol=1e-6), k
        assert sum(w.nbytes for w in wire.values()) * 2 == sum(t.nbytes for t in trainable.values())


def test_site_keeps_the_base_it_was_sent_and_refuses_another(tmp_path):
    spec = replace(SPEC, finetune="lora", wire_dtype="bfloat16")
    gm, trainable = _start(spec)
    first = gm.outgoing(trainable, with_base=True)
    model = site_model(first, gm.spec, SiteWorkdir(tmp_path).frozen_base)
    assert (SiteWorkdir(tmp_path).frozen_base).is_file()
    later = gm.outgoing(trainable, with_base=False)  # only the adapters and the head
    assert set(later) == set(trainable)
    again = site_model(later, gm.spec, SiteWorkdir(tmp_path).frozen_base)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k

    tampered = load_weights(SiteWorkdir(tmp_path).frozen_base)
    tampered["encoder.patch_embed.proj.bias"][0] += 1e-3
    save_weights(SiteWorkdir(tmp_path).frozen_base, tampered)
    with pytest.raises(BaseMismatch, match="this site's frozen base .* differs from the federation's"):
        site_model(later, gm.spec, SiteWorkdir(tmp_path).frozen_base)
    with pytest.raises(BaseMismatch, match="the frozen base the server sent hashes to"):
        site_model(
            {**first, "encoder.pos_embed": first["encoder.pos_embed"] * 2},
            gm.spec,
            SiteWorkdir(tmp_path / "b").frozen_base,
        )
    with pytest.raises(BaseMismatch, match="holds no frozen base"):
        site_model(later, gm.spec, SiteWorkdir(tmp_path / "new-site").frozen_base)


def test_outbound_check_accepts_the_trainable_tensors_and_refuses_a_frozen_one(tmp_path):
    gm, trainable = _start(replace(SPEC, finetune="ffa-lora", wire_dtype="float16"))
    received = gm.outgoing(trainable, with_base=True)
    reference = trainable_part(received, gm.spec)
    assert set(reference) == set(trainable)
    sent = to_wire(trainable, "float16")
    check_outbound(sent, reference, {"num-examples": 10})
    leak = next(k for k in gm.base if "lora_A" in k)
    with pytest.raises(OutboundViolation, match="extra"):
        check_outbound({**sent, leak: gm.base[leak]}, reference, {})
    with pytest.raises(OutboundViolation, match="dtype"):
        check_outbound(trainable, reference, {})  # float32 where float16 travels


def test_checkpoint_resumes_to_the_same_split_and_merges_to_a_plain_vit(tmp_path):
    spec = replace(SPEC, finetune="lora")
    gm, trainable = _start(spec)
    trained = {k: v + 0.01 for k, v in trainable.items()}
    save_weights(tmp_path / "ckpt.safetensors", gm.full(trained))
    torch.manual_seed(123)  # a resumed server's fresh model differs; the checkpoint overrides it
    model = prepare(SurvivalViT(spec.arch), spec)
    model.load_state_dict(load_weights(tmp_path / "ckpt.safetensors"))
    resumed, again = GlobalModel.start(model, spec)
    assert resumed.spec.base_sha256 == gm.spec.base_sha256
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    SurvivalViT(spec.arch).load_state_dict(gm.plain(trained), strict=True)


def test_server_config_validates_the_finetune_keys(tmp_path):
    base = {"federation": {"rounds": 1, "min_sites": 1}}
    good = server_config_from_dict(
        {**base, "model": {"finetune": "last:2", "wire_dtype": "bfloat16"}}, "s", tmp_path
    )
    assert good.model.finetune == "last:2"
    for bad, key in [
        ({"finetune": "adapter"}, "finetune"),
        ({"finetune": "last:0"}, "finetune"),
        ({"finetune": "lora", "lora_targets": "qkv,head"}, "lora_targets"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"wire_dtype": "int8"}, "wire_dtype"),
        ({"base_sha256": "00"}, "base_sha256"),
    ]:
        with pytest.raises(ConfigError, match=rf"\[model\]\.{key}"):
            server_config_from_dict({**base, "model": bad}, "s", tmp_path)
    record = spec_to_record(good.model)
    assert spec_from_record(record) == good.model
    with pytest.raises(ValueError, match="finetune"):
        spec_from_record({**record, "finetune": "everything"})
    with pytest.raises(ValueError, match="lora-rank"):
        spec_from_record({k: v for k, v in record.items() if k != "lora-rank"})


def test_server_sends_the_base_once_screens_adapters_and_saves_a_plain_global_model(tmp_path):
    from flwr.app import ArrayRecord

    from fahr_server.state import FederationState
    from fahr_server.strategy import FahrFedAvg
    from tests.support import sent_round, train_reply

    spec = replace(SPEC, finetune="lora", wire_dtype="bfloat16")
    gm, trainable = _start(spec)
    state = FederationState(0, 3, "", "", "test", {})
    strategy = FahrFedAvg(tmp_path, 3, 2, 1.0, {}, state, join_timeout_s=1, model=gm)
    first = strategy.outgoing(ArrayRecord(trainable)).to_torch_state_dict()
    later = strategy.outgoing(ArrayRecord(trainable)).to_torch_state_dict()
    assert set(first) == set(trainable) | set(gm.base) and set(later) == set(trainable)
    assert all(later[k].dtype == torch.int16 for k in later)  # bfloat16 bits
    sent_round(strategy, trainable, ())
    a = {k: v + 0.25 for k, v in trainable.items()}
    b = {k: v - 0.5 for k, v in trainable.items()}
    leak = next(k for k in gm.base if k.endswith("qkv.base.weight"))
    replies = [
        train_reply(1, "a", to_wire(a, "bfloat16")),
        train_reply(2, "b", to_wire(b, "bfloat16")),
        train_reply(3, "c", {**to_wire(a, "bfloat16"), leak: gm.base[leak]}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    for k, v in trainable.items():
        assert torch.allclose(new[k], v - 0.125, atol=0.01 * (v.abs().max() + 0.5)), k
    assert "extra" in ServerWorkdir(tmp_path).rejections_log.read_text()
    checkpoint = load_weights(ServerWorkdir(tmp_path).checkpoint(1))
    assert set(checkpoint) == set(trainable) | set(gm.base)
    SurvivalViT(spec.arch).load_state_dict(load_weights(ServerWorkdir(tmp_path).global_model), strict=True)
