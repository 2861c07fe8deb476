"""The configuration of a training run: every field with its default and help, declared once.

:class:`TrainConfig` is what ``retrieval train`` options, a ``--config`` YAML file and the saved
``config.yaml`` of a run all describe; the command line builds its options from these fields
(their ``help`` metadata), so a new field needs no second declaration. Importing this module is
cheap (no torch): the registries it checks against are imported by :meth:`TrainConfig.validate`.
"""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from data.fashion_mnist import IMAGE_SIZE, SEEN_CLASSES
from retrieval.errors import UserError
from retrieval.model.spec import DEFAULT_EMBEDDING_DIM, EMBEDDINGS, STEMS
from retrieval.training.schedule import SCHEDULES

#: The built-in dataset, the default training source.
BUILTIN_SOURCE = "fashion-mnist"
#: Options that may change when a run is resumed (the others would make it a different run).
RESUME_OVERRIDABLE = ("epochs", "device", "num_workers", "patience")
#: Smallest input of EfficientNet-Lite0 (its five stride-2 stages leave a 1 x 1 map at 32 px).
LITE_MIN_IMAGE_SIZE = 32
#: Share of the images held out for validation when neither split option is given.
DEFAULT_VAL_FRACTION = 0.1


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text (and command-line details: ``flag``, ``metavar``)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder."""

    data: str = _opt(
        BUILTIN_SOURCE,
        "Training source: fashion-mnist[:train], a folder of class sub-folders, or a CSV manifest.",
    )
    data_root: str | None = _opt(None, "Folder of the built-in dataset, when not the default.")
    split: str | None = _opt(None, "Split of the source (built-in: train; CSV: split column).")
    classes: str | None = _opt(
        None,
        f"Classes to train on, e.g. 0-4 or cat,dog ('' = all). Default: {SEEN_CLASSES} (the "
        "seen classes) for the built-in dataset, all classes of any other source.",
    )
    per_class: int | None = _opt(
        None,
        "Use at most this many images of each class (drawn with --seed, before the validation "
        "split; default all).",
    )
    val_fraction: float | None = _opt(
        None,
        f"Share of the training classes' images held out for model selection (closed-set); "
        f"default {DEFAULT_VAL_FRACTION} unless --val-classes is given, 0 = no validation.",
    )
    val_classes: str | None = _opt(
        None,
        "Hold out whole training classes for model selection instead (open-set: best.pt and "
        "early stopping then reward retrieval of classes never trained on): a fraction of the "
        "classes with a decimal point, e.g. 0.2 (drawn with --seed), or a list of class "
        "indices or names, e.g. 3,7 or 5-9 or cat,dog.",
    )
    arch: str = _opt(
        "small",
        "Backbone: small | resnet18 | resnet34 | resnet50 | mobilenet_v3_small | "
        "mobilenet_v3_large | efficientnet_b0 | convnext_tiny | efficientnet_lite0.",
    )
    stem: str = _opt("small", "small (28-64 px inputs) | imagenet (the original stem).")
    pretrained: str | None = _opt(
        None, "imagenet, or PATH of a torchvision-format state dict of the backbone."
    )
    backbone_blocks: int | None = _opt(
        None,
        "Keep only the first N blocks of the backbone (efficientnet_lite0: 1-16) and index "
        "their averaged output; earlier features can transfer better to images unlike the "
        "pretraining data. Default: all.",
    )
    pool_grid: int | None = _opt(
        None,
        "Average the backbone's last feature map over an N x N layout instead of globally "
        "(efficientnet_lite0): the indexed features keep where things are, which helps "
        "centred images (product shots, scans, silhouettes). Default: 1, global.",
    )
    embedding_dim: int = _opt(DEFAULT_EMBEDDING_DIM, "Length of the embedding head's output.")
    embedding: str = _opt(
        "head",
        "What is indexed: head (the embedding head's output) or features (the backbone "
        "features under it; they transfer better to unseen classes).",
    )
    image_size: int = _opt(IMAGE_SIZE, "Side of the square model input, pixels.")
    loss: str = _opt(
        "triplet",
        "Embedding loss: triplet, contrastive, cosine-embedding, hinge-embedding, arcface, "
        "infonce, multiple-negatives-ranking, supcon, ...",
    )
    miner: str | None = _opt(
        None,
        "all | batch-hard | semi-hard | easy-hard | triplet-margin | distance-weighted | "
        "pair-margin | multi-similarity (default: the loss's natural one).",
    )
    loss_args: dict = _opt(
        {}, "Loss argument KEY=VALUE (repeatable), e.g. margin=0.5.", flag="--loss-arg"
    )
    miner_args: dict = _opt({}, "Miner argument KEY=VALUE (repeatable).", flag="--miner-arg")
    epochs: int = _opt(3, "Training epochs.")
    batch_size: int = _opt(
        128, "Images per batch (P classes x K images), over all processes under torchrun."
    )
    m_per_class: int = _opt(32, "K: images of each class in a batch.")
    lr: float = _opt(3e-4, "Adam learning rate (the peak, with a schedule).")
    backbone_lr: float | None = _opt(
        None,
        "Learning rate of the backbone (the peak, with the schedule); the head and the loss "
        "train at --lr. 0 freezes the backbone. Default: --lr.",
    )
    freeze_bn: bool = _opt(
        False,
        "Keep the backbone's BatchNorm statistics as they start (pretrained ones) instead of "
        "re-estimating them from the training batches.",
    )
    weight_decay: float = _opt(0.0, "Adam weight decay.")
    schedule: str = _opt("constant", "Learning-rate schedule per step: constant | cosine.")
    warmup_epochs: float = _opt(0.0, "Linear learning-rate warm-up, epochs.")
    grad_clip: float = _opt(0.0, "Max gradient norm (0 = no clipping).")
    patience: int = _opt(
        0, "Early stop after this many epochs without a better validation MAP@R (0 = never)."
    )
    amp: bool = _opt(True, "Mixed precision on CUDA (never used on the CPU).")
    margin: float = _opt(0.2, "Triplet margin (loss and semi-hard miner), in distance units.")
    augment: bool = _opt(True, "Random resized crop and horizontal flip.")
    seed: int = _opt(0, "Random seed.")
    device: str = _opt("auto", "auto | cpu | cuda | mps.")
    num_workers: int = _opt(0, "DataLoader worker processes.")
    out: str = _opt("runs/train", "Run folder.")

    def training_classes(self) -> str:
        """The ``--classes`` in force: the built-in dataset's seen classes by default, all the
        classes of a user's data (``''``)."""
        if self.classes is not None:
            return self.classes
        return SEEN_CLASSES if self.data.split(":")[0] == BUILTIN_SOURCE else ""

    def image_val_fraction(self) -> float:
        """The ``val_fraction`` in force: :data:`DEFAULT_VAL_FRACTION` unless given, 0 when
        whole classes are held out (``val_classes``)."""
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if self.val_classes else DEFAULT_VAL_FRACTION

    def validate(self) -> None:
        """Raise :class:`UserError` on values that cannot work."""
        from retrieval.model.networks import BACKBONES, MAX_POOL_GRID
        from retrieval.training.objectives import MINERS, TRAINING_LOSSES

        positive = ("embedding_dim", "image_size", "epochs", "batch_size", "m_per_class")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.m_per_class:
            raise UserError(
                f"batch_size ({self.batch_size}) must be a multiple of m_per_class "
                f"({self.m_per_class})"
            )
        if self.batch_size // self.m_per_class < 2:
            raise UserError("a batch needs at least two classes: batch_size >= 2 * m_per_class")
        if self.val_classes is not None and self.val_fraction is not None:
            raise UserError(
                "give either val_fraction (images of every class) or val_classes (whole "
                "classes) for the validation split, not both"
            )
        if not 0.0 <= self.image_val_fraction() < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.backbone_lr is not None and self.backbone_lr < 0:
            raise UserError(f"backbone_lr must not be negative (0 freezes), got {self.backbone_lr}")
        if self.pool_grid is not None and not 1 <= self.pool_grid <= MAX_POOL_GRID:
            raise UserError(
                f"pool_grid must be between 1 and {MAX_POOL_GRID} (cells per side), got "
                f"{self.pool_grid}"
            )
        if self.arch == "efficientnet_lite0" and self.image_size < LITE_MIN_IMAGE_SIZE:
            raise UserError(
                f"efficientnet_lite0 needs images of at least {LITE_MIN_IMAGE_SIZE} px (its "
                f"own size is 224; 96 suits small images), got image_size {self.image_size}"
            )
        if self.per_class is not None and self.per_class < 2:
            raise UserError(f"per_class must be at least 2 (a positive pair), got {self.per_class}")
        for name in ("weight_decay", "warmup_epochs", "grad_clip", "patience", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        choices = {
            "embedding": EMBEDDINGS,
            "stem": STEMS,
            "schedule": SCHEDULES,
            "loss": tuple(TRAINING_LOSSES),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.miner is not None and self.miner not in MINERS:
            raise UserError(f"unknown miner {self.miner!r}; miners: {', '.join(MINERS)}")
        if self.arch not in BACKBONES:
            raise UserError(
                f"unknown backbone {self.arch!r}; choose one of {', '.join(sorted(BACKBONES))}"
            )
        for name in ("loss_args", "miner_args"):
            if not isinstance(getattr(self, name), dict):
                raise UserError(f"{name} must be a mapping of argument: value")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown configuration keys {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _checked(name, value, hints[name]) for name, value in values.items()})


#: How a type is named in an error message.
_TYPE_NAMES = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    dict: "a mapping of key: value",
}


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits the field's type ``hint``, else :class:`UserError` (a config file
    can hold ``epochs: "3"`` or ``augment: 1``, which would fail later with a traceback). An
    integer is a number, ``true`` is not a whole number, and a number given for a text field
    is that text (YAML reads ``val_classes: 0.2`` and ``classes: 5`` as numbers)."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return value
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if kind in (str, dict) and isinstance(value, kind):
            return value
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    wanted = " or ".join(_TYPE_NAMES.get(k, "nothing (null)") for k in allowed)
    raise UserError(f"{name} must be {wanted}, got {value!r}")


def resolve_config(
    given: dict[str, Any], config_file: str | os.PathLike | None = None, resume: str | None = None
) -> TrainConfig:
    """The configuration of a run from its three sources, later ones winning: the defaults, a
    YAML file of options, the options ``given`` (the command line). With ``resume`` (a run
    folder) the run's own configuration, of which only :data:`RESUME_OVERRIDABLE` may change.

    Raises:
        UserError: a missing or invalid file, an unknown option, or a change ``resume`` forbids.
    """
    if resume is not None:
        from retrieval.training.loop import load_run_config

        fixed = sorted(k for k in given if k not in RESUME_OVERRIDABLE)
        if fixed or config_file is not None:
            raise UserError(
                f"--resume continues a run as it was configured; only "
                f"{', '.join(RESUME_OVERRIDABLE)} may be given "
                f"(got {', '.join(fixed) or '--config'})"
            )
        return TrainConfig.from_dict(asdict(load_run_config(resume)) | given)
    values: dict = {}
    if config_file is not None:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path} must hold a mapping of option: value")
        values.update(loaded)
    values.update(given)
    if values.get("pretrained") is not None:
        values = pretrained_defaults(values) | values
    return TrainConfig.from_dict(values)


def pretrained_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning recipe's values for a run that starts from a pretrained backbone
    (:data:`retrieval.training.recipe.PRETRAINED_RECIPE`), except what names the start
    (backbone, weights, stem) and the image size, which the start or the user chooses."""
    from retrieval.model.resolve import NATIVE_IMAGE_SIZE
    from retrieval.training.recipe import PRETRAINED_RECIPE

    fixed = ("arch", "pretrained", "stem", "image_size")
    out = {k: v for k, v in PRETRAINED_RECIPE.items() if k not in fixed and k not in values}
    arch = values.get("arch")
    if arch == "efficientnet_lite0":  # as `--model NAME`: its own stem and input size, not 28 px
        start = {"stem": "imagenet", "image_size": NATIVE_IMAGE_SIZE[arch]}
        out |= {k: v for k, v in start.items() if k not in values}
    return out
