"""The fine-tuning recipe for a pretrained backbone, chosen by measurement.

``retrieval train --model NAME`` (a pretrained start) uses these values for every option the
user does not give; ``configs/finetune-pretrained.yaml`` holds the same values as a file. The
alternatives measured and the figures behind each choice are in ``docs/results.md``
("Fine-tuning a pretrained backbone"; ``scripts/finetune_recipe.py`` measures them).
"""

from __future__ import annotations

#: Option values of the recipe (fields of :class:`retrieval.training.config.TrainConfig`).
PRETRAINED_RECIPE: dict = {
    "arch": "efficientnet_lite0",
    "pretrained": "imagenet",
    "stem": "imagenet",
    "image_size": 96,
    "embedding": "features",
    "loss": "triplet",
    "lr": 1e-3,
    "backbone_lr": 3e-5,
    "freeze_bn": True,
    "schedule": "cosine",
    "warmup_epochs": 0.25,
    "augment": True,
    "epochs": 2,
    "batch_size": 64,
    "m_per_class": 16,
}
