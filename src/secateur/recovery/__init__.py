"""recovery/: win accuracy back after pruning: BatchNorm recalibration, fine-tuning, and
distillation from the teacher."""

from .._embed import default_embed as default_embed
from ._batchnorm import batchnorm_layers as batchnorm_layers
from ._batchnorm import recalibrate_batchnorm_ as recalibrate_batchnorm_
from ._distill import DistillConfig as DistillConfig
from ._distill import EmbeddingLoss as EmbeddingLoss
from ._distill import check_feature_names as check_feature_names
from ._distill import distill as distill
from ._distill import distill_embeddings as distill_embeddings
from ._distill import distillation_loss as distillation_loss
from ._distill import schedule_factor as schedule_factor
from ._finetune import finetune as finetune

__all__ = [
    "batchnorm_layers",
    "recalibrate_batchnorm_",
    "DistillConfig",
    "EmbeddingLoss",
    "check_feature_names",
    "default_embed",
    "distill",
    "distill_embeddings",
    "distillation_loss",
    "schedule_factor",
    "finetune",
]
