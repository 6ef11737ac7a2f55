"""Models by name: pwf's own small networks (a registry) and every timm architecture, and the
config section that names one (:class:`ModelConfig`).

Nothing here touches the network: timm models are built with ``pretrained=False`` (timm then
never asks the Hugging Face hub for anything); trained weights come from local files. timm is
imported where a timm model is named: importing it pulls in torchvision and torch._dynamo, a
second and a half that every pwf command and worker process would otherwise pay for nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from pwf_core._files import load_tensors
from pwf_core.errors import CheckpointError
from pwf_core.types import Section

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model(factory: ModelFactory) -> ModelFactory:
    """Register a model factory under its function name."""
    _MODELS[factory.__name__] = factory
    return factory


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks, global pooling and a linear head; any input size >= 2.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        width: Channels of the first block (the others use twice as many).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_chans, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def small_cnn(num_classes: int = 10, in_chans: int = 1, img_size: int | None = None, **kwargs: Any):
    """The default model: a ~56 k-parameter CNN that reaches ~98 % on digits in seconds."""
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, **kwargs)


class MnistCNN(nn.Module):
    """Two conv stages (32 and 64 channels, each two 3x3 convs and a 2x2 pool) and a dense head:
    the classic layout that reaches 99 %+ on MNIST, where global pooling would discard layout.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        img_size: Input side (28 for MNIST); the head is sized for it.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = []
            for first in (cin, cout):
                layers += [nn.Conv2d(first, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
                layers.append(nn.ReLU())
            return [*layers, nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(in_chans, 32), *stage(32, 64), nn.Flatten())
        side = img_size // 4
        self.head = nn.Sequential(
            nn.Linear(64 * side * side, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def mnist_cnn(num_classes: int = 10, in_chans: int = 1, img_size: int | None = None, **kwargs: Any):
    """A ~470 k-parameter CNN for 28x28 digits (MNIST): 99 %+ in three epochs."""
    return MnistCNN(num_classes=num_classes, in_chans=in_chans, img_size=img_size or 28, **kwargs)


@register_model
def cifar_resnet18(
    num_classes: int = 10, in_chans: int = 3, img_size: int | None = None, **kwargs: Any
):
    """timm's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool.

    The ImageNet stem shrinks a 32x32 image to 8x8 before the first block; this one keeps
    32x32, the layout of the ResNet-18 CIFAR-10 results (about 95 % top-1).
    """
    import timm

    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
    stem = model.conv1.out_channels  # 64, or the ``stem_width`` given
    model.conv1 = nn.Conv2d(in_chans, stem, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def pwf_model_names() -> list[str]:
    """The models pwf registers itself."""
    return sorted(_MODELS)


def is_known_model(name: str) -> bool:
    """Whether ``name`` is a pwf model or a timm architecture."""
    if name in _MODELS:
        return True
    import timm

    return timm.is_model(name)


def similar_model_names(name: str, limit: int = 5) -> list[str]:
    """Registered and timm names close to ``name``, for error messages."""
    import timm

    candidates = [*_MODELS, *timm.list_models()]
    return difflib.get_close_matches(name, candidates, n=limit, cutoff=0.6)


# Arguments pwf passes to every architecture from the dataset it trains on.
_FROM_DATASET = {
    "img_size": "its images' side: 8 for digits, 28 for MNIST, 32 for CIFAR-10, data.img_size "
    "for an image folder",
    "in_chans": "its images' channels",
    "num_classes": "its classes",
}


class ModelConfig(Section):
    """Which network to compress.

    Args:
        name: One of pwf's models (``small_cnn``, ``mnist_cnn``, ``cifar_resnet18``) or any timm
            architecture name.
        weights: Optional local file (safetensors or ``.pt``) with trained weights; when given,
            pretraining starts from it instead of from a random init.
        kwargs: Extra architecture arguments, e.g. ``{patch_size: 2}`` for a ViT on 8x8 inputs.
    """

    name: str = "small_cnn"
    weights: Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if not is_known_model(name):
            hint = similar_model_names(name)
            suffix = f"; did you mean one of {hint}?" if hint else ""
            own = ", ".join(pwf_model_names())
            raise ValueError(f"unknown model '{name}' (not one of pwf's {own}, not timm's){suffix}")
        return name

    @field_validator("kwargs")
    @classmethod
    def _not_from_the_dataset(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        given = [key for key in _FROM_DATASET if key in kwargs]
        if given:
            raise ValueError(
                f"{', '.join(given)} comes from the dataset ({_FROM_DATASET[given[0]]}), not "
                "from model.kwargs: leave it out"
            )
        return kwargs

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, weights: Path | None) -> Path | None:
        if weights is not None and weights.is_dir():
            raise ValueError(f"weights file '{weights}' is a folder; name the file in it")
        if weights is not None and not weights.is_file():
            raise ValueError(f"weights file '{weights}' does not exist")
        return weights


def build_model(
    name: str,
    num_classes: int,
    in_chans: int,
    img_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised model by name.

    Args:
        name: ``small_cnn`` or any timm architecture (``resnet18``, ``vit_tiny_patch16_224``...).
        num_classes: Classifier outputs.
        in_chans: Input channels.
        img_size: Input side, passed to architectures that take it (ViTs); others ignore it.
        **kwargs: Extra architecture arguments (e.g. ``patch_size`` for a ViT on small images).

    Raises:
        ValueError: for an unknown name.
    """
    if name in _MODELS:
        return _MODELS[name](
            num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
        )
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}'; close names: {similar_model_names(name)}")
    create = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=img_size, **create)
        except TypeError as err:
            # Convolutional timm models take no img_size; that is the only error we absorb.
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **create)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an architecture: what an exported model records.

    Args:
        name: Registered or timm architecture name.
        num_classes: Classifier outputs.
        in_chans: Input channels.
        img_size: Input side (for architectures that take it).
        kwargs: Extra architecture arguments.
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A freshly initialised instance of the architecture."""
        return build_model(self.name, self.num_classes, self.in_chans, self.img_size, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load trained weights from a local safetensors or ``.pt`` file into ``model``.

    Raises:
        CheckpointError: when the file is missing or unreadable, or its names or shapes do
            not match the model (every mismatch is listed).
    """
    state = load_tensors(path)
    expected = model.state_dict()
    problems = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems += [f"{key}: missing from file" for key in expected if key not in state]
    problems += [f"{key}: not in model" for key in state if key not in expected]
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"weights in '{path}' do not fit the model:\n  {listed}{more}")
    model.load_state_dict(state)
    return model
