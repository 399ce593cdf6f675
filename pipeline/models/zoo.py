"""Model zoo: a VGG-style CNN, CIFAR-style ResNets (20/56), any torchvision classifier,
segmenter or detector (``pipeline.models.segmentation``, ``pipeline.models.detection``), any timm
model (``timm:<name>``, the optional ``timm`` extra), or a user factory given as
``module.path:function``. All are built from constructor arguments so a
pruned model can be rebuilt from its spec plus a shape manifest.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.config import ModelConfig, from_dict, to_dict

logger = logging.getLogger(__name__)

_VGG_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
    ],
}


class ModelError(ValueError):
    """A model spec cannot be built; the message lists what is accepted."""


class VGG(nn.Module):
    """Network-Slimming-style VGG: conv-BN-ReLU stacks, global average pool, linear head."""

    def __init__(
        self, depth: int = 11, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, round(v * width))
            layers += [
                nn.Conv2d(c, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """CIFAR ResNet block; a 1x1 projection shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-20/56 for 32x32 inputs: three stages of 6n+2 layers, widths 16/32/64 x width."""

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (20, 56, 110), got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(w * width)) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(c, w, 2 if stage > 0 and i == 0 else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    from pipeline.models.detection import DETECTORS
    from pipeline.models.segmentation import SEGMENTERS

    available = torchvision.models.list_models(module=torchvision.models)
    if name in SEGMENTERS or name in DETECTORS:
        return _dense_task(name, num_classes, in_channels)
    if name not in available:
        raise ModelError(
            f"unknown torchvision model {name!r}; choose one of: {', '.join(available)}; "
            f"segmenters: {', '.join(SEGMENTERS)}; detectors: {', '.join(DETECTORS)}"
        )
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(init_weights=False, aux_logits=False)
    model = torchvision.models.get_model(name, **kwargs)
    if in_channels != 3:
        raise ModelError(
            f"torchvision:{name} takes 3 input channels, the data has {in_channels}; "
            "use an RGB dataset or a model spec that accepts in_channels"
        )
    return model


def default_num_classes(spec: str) -> int:
    """The classes ``--model spec`` gets without ``--num-classes``: torchvision's own default
    for the family (21, Pascal VOC's, for its segmenters; 91, COCO's, for its detectors), and
    ImageNet's 1000 for everything else."""
    from pipeline.models.detection import DETECTORS
    from pipeline.models.segmentation import SEGMENTERS

    name = spec.removeprefix("torchvision:") if spec.startswith("torchvision:") else None
    if name in SEGMENTERS:
        return 21
    if name in DETECTORS:
        return 91
    return 1000


def _dense_task(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A torchvision segmenter, or a detector's traceable part (``pipeline.models.detection``)."""
    from pipeline.models.detection import DETECTORS, build_detector
    from pipeline.models.segmentation import build_segmenter

    if in_channels != 3:
        raise ModelError(
            f"torchvision:{name} takes 3 input channels, the data has {in_channels}; "
            "use an RGB dataset or input shape"
        )
    if name in DETECTORS:
        return build_detector(name, num_classes)
    return build_segmenter(name, num_classes)


def _timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """``timm.create_model(name)`` untrained: nothing is downloaded, so no ``pretrained``."""
    try:
        import timm
    except ImportError as err:
        raise ModelError(
            f"timm:{name} needs the timm package, which is not installed ({err}); install it "
            "with pip install 'recede[timm]' (or pip install timm)"
        ) from None
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ModelError(
            f"unknown timm model {name!r}; "
            + (
                f"close names: {', '.join(close)}"
                if close
                else "the names timm knows are "
                'listed by: python -c "import timm; print(timm.list_models())"'
            )
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def _factory(spec: str) -> Callable[..., nn.Module]:
    """The object ``spec`` (``package.module:name``) names; whatever importing the user's module
    raises (a SyntaxError, any exception at its top level, a sys.exit) is a ModelError."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(
            f"cannot import model factory {spec!r} ({err}); expected 'package.module:function' "
            "importable from the current environment (run from its folder with PYTHONPATH=.)"
        ) from None
    except SyntaxError as err:
        where = f"{err.filename}, line {err.lineno}" if err.filename else module_name
        raise ModelError(
            f"cannot import model factory {spec!r}: {where}: SyntaxError: {err.msg}; expected a "
            "module Python can import; fix the syntax there"
        ) from None
    except (Exception, SystemExit) as err:  # noqa: BLE001 - user code may raise anything
        raise ModelError(
            f"cannot import model factory {spec!r}: importing {module_name} raised "
            f"{type(err).__name__}: {err}; expected a module that imports cleanly; fix the code "
            "it runs at import"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelError(
            f"cannot import model factory {spec!r}: module {module_name} has no {attr!r}; "
            "expected 'package.module:function' naming a function or class in it"
        ) from None


def _call_factory(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Call the user factory ``name``; whatever it raises, or a ``sys.exit``, is a ModelError.

    Named by ``--model`` or by ``model.name`` in a config, a factory fails the same way: with
    a message naming it, never a traceback, and never an exit code of its own choosing.
    """
    factory = _factory(name)
    if not callable(factory):
        raise ModelError(
            f"model factory {name!r} is a {type(factory).__name__}, not a callable; expected "
            "'package.module:function' naming a function or class that returns an nn.Module"
        )
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature: pass nothing
        params = {}
    given = {"num_classes": num_classes, "in_channels": in_channels}
    kwargs = {k: v for k, v in given.items() if k in params}
    try:
        model = factory(**kwargs)
    except ModelError:
        raise
    except SystemExit as err:  # user code must not decide recede's exit code
        raise ModelError(
            f"model factory {name!r} called sys.exit({err.code!r}) while building the model; "
            "expected it to return an nn.Module or raise an exception; remove the sys.exit call"
        ) from None
    except Exception as err:  # noqa: BLE001 - user code may raise anything; name it
        raise ModelError(
            f"model factory {name!r}: building it raised {type(err).__name__}: {err}; expected "
            f"an nn.Module built with num_classes={num_classes}, in_channels={in_channels}; "
            "fix the factory or the settings it was given"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {name!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def build_model(cfg: ModelConfig, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model named by ``cfg.name`` (see module docstring for accepted specs)."""
    name = cfg.name
    if name == "vgg":
        return VGG(cfg.depth, num_classes, in_channels, cfg.width)
    if name in ("resnet20", "resnet56"):
        return CifarResNet(int(name[6:]), num_classes, in_channels, cfg.width)
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], num_classes, in_channels)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], num_classes, in_channels)
    if ":" in name:
        return _call_factory(name, num_classes, in_channels)
    raise ModelError(
        f"unknown model {name!r}; use vgg, resnet20, resnet56, torchvision:<name>, "
        "timm:<name> or package.module:factory"
    )


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model from its constructor: the ``spec`` of a saved model.

    ``input_shape`` is one example's (C, H, W); ``bounded_bn``/``bn_shift`` say whether the BNs
    were converted to bounded BN (``pipeline.layers.bounded_bn``) before the weights were saved.
    """

    model: ModelConfig
    num_classes: int
    in_channels: int
    input_shape: tuple[int, ...]
    bounded_bn: bool = False
    bn_shift: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written into ``shapes.json`` under ``spec``."""
        return {
            "model": to_dict(self.model),
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "bounded_bn": self.bounded_bn,
            "bn_shift": self.bn_shift,
            "input_shape": list(self.input_shape),
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ModelSpec:
        """Read :meth:`to_dict`'s form back; older specs without ``bounded_bn``/``bn_shift``
        mean plain BN. Other keys are ignored, as they always were."""
        return cls(
            model=from_dict(ModelConfig, spec["model"]),
            num_classes=int(spec["num_classes"]),
            in_channels=int(spec["in_channels"]),
            input_shape=tuple(int(d) for d in spec["input_shape"]),
            bounded_bn=bool(spec.get("bounded_bn", False)),
            bn_shift=bool(spec.get("bn_shift", False)),
        )

    def build(self) -> nn.Module:
        """The unpruned model with plain BN, from its constructor (see :func:`build_model`)."""
        return build_model(self.model, num_classes=self.num_classes, in_channels=self.in_channels)
