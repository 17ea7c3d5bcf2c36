"""Where a federation's survival model starts: an encoder checkpoint, or an age model folded in.

`initial_model` is what the server builds from its `[model]` table (and the in-process federation
of `fahr_client.simulation` builds the same way). With `[model].init_age_model` the survival model
starts from an age model: its encoder, and a risk head that already ranks faces by predicted age.

Why: a federation's first rounds are few and, under DP, noisy. A risk head that starts at zero
must learn from those rounds which direction of the features carries risk, and DP noise on a
128-d (or 768-d) head buries much of that signal. Age is the strongest single predictor of
mortality, and the age model already reads it from the face, so the survival model starts with
risk = `log_hr_per_year` x (predicted age - the age model's training mean), and the federation
only has to correct it (sex, disease, the cohort's own age effect).

The fold is exact, not fitted. The age model computes age = mean + sd * (w . fc_norm(x) + c), with
fc_norm the encoder's last LayerNorm (affine g, b). The survival head applies its own LayerNorm
before its risk Linear. We move the affine of fc_norm into the head's LayerNorm (fc_norm keeps
only the standardisation: weight 1, bias 0), which leaves the head's LayerNorm with an already
standardised input, so it reproduces g * xhat + b; then risk.weight = k * sd * w and
risk.bias = k * sd * c, with k = `log_hr_per_year`. The only difference from the age model is the
two LayerNorms' epsilons (1e-6 and 1e-5), a relative error of about 1e-5.

The scale k matters for training, not for ranking (C is invariant to it): the discrete-hazard
loss's gradient is near zero when eta is already on the scale of the log hazard ratio. The default
is the Gompertz law of adult human mortality, which doubles about every 8 years of age
(k = ln 2 / 8 = 0.087 per year, about 1.0 per 12-year SD of a cohort's ages): a prior from
demography, not from any site. A cohort whose risk depends less on age (a disease that strikes
the young) gets a smaller `[model].init_log_hr_per_year`; its sites' training corrects the rest.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from fahr_core.age.model import KIND as AGE_MODEL_KIND
from fahr_core.age.model import AgeViT, load_age_model
from fahr_core.config import ModelConfig
from fahr_core.models.checkpoint import load_encoder_weights
from fahr_core.models.vit import SurvivalViT

log = logging.getLogger(__name__)


@torch.no_grad()
def init_from_age_model(model: SurvivalViT, age: AgeViT, log_hr_per_year: float) -> SurvivalViT:
    """Load `age`'s encoder into `model` and fold its head into the risk head (in place).

    After this, model's eta = log_hr_per_year * (age(x) - age.age_mean) for every face x (to the
    LayerNorms' epsilons). The baseline hazard head is left as it is: the sites learn it.
    """
    if not (math.isfinite(log_hr_per_year) and log_hr_per_year > 0):
        raise ValueError(f"log_hr_per_year must be a finite number > 0, not {log_hr_per_year!r}")
    enc, head = model.encoder, model.head
    own = {k: v.shape for k, v in enc.state_dict().items()}
    if own != {k: v.shape for k, v in age.encoder.state_dict().items()}:
        raise ValueError(
            f"the age model is a {age.arch} at {age.img_size} px, which is not the survival model's "
            "[model].arch and img_size"
        )
    enc.load_state_dict(age.encoder.state_dict(), strict=True)
    fc_norm = enc.fc_norm
    if not isinstance(fc_norm, torch.nn.LayerNorm):  # the fold moves a LayerNorm's affine into the head
        raise TypeError(f"the encoder's fc_norm is a {type(fc_norm).__name__}, not a LayerNorm")
    head.norm.weight.copy_(fc_norm.weight)
    head.norm.bias.copy_(fc_norm.bias)
    torch.nn.init.ones_(fc_norm.weight)
    torch.nn.init.zeros_(fc_norm.bias)
    k = log_hr_per_year * float(age.get_buffer("age_scale"))
    head.risk.weight.copy_(k * age.head.weight)
    head.risk.bias.copy_(k * age.head.bias)
    return model


def init_problem(spec: ModelConfig) -> str | None:
    """Why `spec.init_age_model` cannot start `spec`'s model, naming the setting; None if it can.

    Read from the file's metadata only (no weights), so `fahr-server run` refuses a wrong file in
    a second, before it starts the SuperLink, rather than in the ServerApp after the sites joined.
    """
    if not spec.init_age_model:
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(spec.init_age_model, framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        return f"[model].init_age_model {spec.init_age_model}: not a safetensors file ({e})"
    if meta.get("kind") != AGE_MODEL_KIND:
        return (
            f"[model].init_age_model {spec.init_age_model}: not a fahr age model (kind={meta.get('kind')!r})"
        )
    if (meta.get("arch"), meta.get("img_size")) != (spec.arch, str(spec.img_size)):
        return (
            f"[model].init_age_model {spec.init_age_model} is a {meta.get('arch')} at {meta.get('img_size')} "
            f"px; [model].arch and img_size say {spec.arch} at {spec.img_size}"
        )
    return None


def initial_model(spec: ModelConfig, seed: int = 0) -> SurvivalViT:
    """The survival model before any round, from `spec`'s init fields (the server's paths, resolved).

    `init_age_model` (the age model's encoder and a folded risk head), else `encoder_checkpoint`
    (that encoder, a zero risk head), else random weights with a warning. The seed fixes the random
    initialisation of whatever no file sets: model init, identical wherever it is rebuilt, not DP
    randomness.
    """
    torch.manual_seed(seed)
    model = SurvivalViT(spec.arch, spec.img_size, spec.n_intervals)
    if spec.init_age_model:
        try:
            init_from_age_model(model, load_age_model(Path(spec.init_age_model)), spec.init_log_hr_per_year)
        except ValueError as e:  # the reader meets this at server start: name the setting
            raise ValueError(f"[model].init_age_model: {e}") from None
    elif spec.encoder_checkpoint:
        load_encoder_weights(model.encoder, Path(spec.encoder_checkpoint))
    else:
        log.warning(
            "neither init_age_model nor encoder_checkpoint configured: the encoder starts from "
            "random weights, not from FAHR-Face MAE pre-training"
        )
    return model
