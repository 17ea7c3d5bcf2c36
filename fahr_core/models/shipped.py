"""The models fahr ships (`fahr_core/demo_data/`, docs/models.md) and the start they were measured from.

`fahr models build` makes them; the demo, the benchmarks and `fahr models shipped` name them from
here, so a coordinator's server starts from the same files and settings that the docs' numbers
(held-out C against the oracle, docs/performance.md) were measured with.
"""

from __future__ import annotations

from fahr_core.cohort.faces import demo_faces_dir
from fahr_core.config import ModelConfig

ARCH = "vit_micro"  # the recipe's architecture (fahr_research.models.Recipe): small enough for 2 cores
# what the sites train from the shipped start: the head and the last block, the demo's mode and the
# one that the warm-start stage and the privacy-utility curve measured (docs/performance.md)
FINETUNE = "last:1"
AGE_MODEL = demo_faces_dir() / "age_vit_micro.safetensors"
MAE_ENCODER = demo_faces_dir() / "mae_vit_micro.safetensors"
AGE_ENCODER = demo_faces_dir() / "encoder_vit_micro.safetensors"  # the age model's encoder alone


def start_spec() -> ModelConfig:
    """The survival model's start that `fahr models build` chose and the demo uses: the shipped age
    model (its encoder, its head folded into the risk head), which every site's FAD analysis uses too."""
    model = str(AGE_MODEL)
    return ModelConfig(arch=ARCH, finetune=FINETUNE, init_age_model=model, age_checkpoint=model)
