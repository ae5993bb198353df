"""recovery/: win accuracy back after pruning (fine-tuning now; distillation later)."""

from ._finetune import finetune as finetune

__all__ = ["finetune"]
