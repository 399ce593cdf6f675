"""Cache latency models per machine, backend, versions, deployment and model architecture.

A latency model is a measurement of one architecture on one machine, so it is filed under
everything that changes the measurement (:func:`cache_key`): the machine (host name, CPU model,
usable cores), the package versions (ONNX Runtime, onnx, torch, recede), the deployment
(``train.latency``: backend, device, precision, batch, threads, clock), the alignment block and
a fingerprint of the model (every module's name and type, the geometry of every conv and linear
layer, the input shape). Any change gives another key and so another file: nothing is ever
invalidated in place.

Files live in ``$RECEDE_CACHE/latency/`` (``~/.cache/recede/latency/`` by default, beside the
Fashion-MNIST cache), one JSON per key, written atomically; a build holds a file lock on its
key, so two runs that need the same model build it once. A file that does not parse, or whose
stored key differs from the one asked for, is rebuilt (with a warning), never trusted. Run
folders never point into the cache: ``recede run`` copies the model it used into its own
folder (``latency_model.json``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.bench.latency_pieces import blocking, input_shapes
from pipeline.config import LatencyConfig
from pipeline.core.atomic import file_lock, write_json_atomic
from pipeline.core.environment import cpu_model, usable_cores, versions
from pipeline.graph.latency_cost import SCHEMA, LatencyModel
from pipeline.layers.bn import is_bn

logger = logging.getLogger(__name__)

Builder = Callable[[nn.Module, torch.Tensor, LatencyConfig], LatencyModel]


def cache_dir() -> Path:
    """``$RECEDE_CACHE/latency`` (default ``~/.cache/recede/latency``)."""
    root = Path(os.environ.get("RECEDE_CACHE", Path.home() / ".cache" / "recede"))
    return root / "latency"


def model_fingerprint(model: nn.Module, example: torch.Tensor) -> str:
    """SHA-256 of what the latency of ``model`` depends on: module names and types, the
    geometry of every conv and linear layer with the input shape it sees, and the per-sample
    input shape (one forward pass; no channel graph)."""
    net = copy.deepcopy(model).cpu().eval()
    shapes = input_shapes(net, example[:1].cpu())
    layers = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            geometry = [m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                        m.dilation, m.groups]  # fmt: skip
            layers.append([name, *geometry, shapes.get(name)])
        elif isinstance(m, nn.Linear):
            layers.append([name, m.in_features, m.out_features, shapes.get(name)])
    described = {  # BN types left out: a plain and a bounded BN time the same once folded
        "input": list(example.shape[1:]),
        "modules": [[n, type(m).__name__] for n, m in net.named_modules() if not is_bn(m)],
        "layers": layers,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=list).encode()).hexdigest()


def cache_key(model: nn.Module, example: torch.Tensor, cfg: LatencyConfig) -> dict[str, Any]:
    """Everything a latency model of ``model`` on ``cfg`` depends on (see module docstring)."""
    found = versions()
    return {
        "schema": SCHEMA,
        "machine": {"host": platform.node(), "cpu": cpu_model(), "cores": usable_cores()},
        "versions": {k: found.get(k) for k in ("onnxruntime", "onnx", "torch", "recede")},
        "deployment": asdict(cfg),
        "blocking": asdict(blocking(cfg)),
        "model": model_fingerprint(model, example),
    }


def cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{key['model'][:12]}-{digest[:16]}.json"


def load_cached(key: dict[str, Any]) -> LatencyModel | None:
    """The cached model filed under ``key``, or None (missing, unreadable or another key)."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        model = LatencyModel.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring the unreadable latency cache %s (%s); rebuilding", path, err)
        return None
    if model.key != key:
        logger.warning("ignoring the latency cache %s: it was built for another key", path)
        return None
    return model


def cached_latency_model(
    model: nn.Module, example: torch.Tensor, cfg: LatencyConfig, build: Builder
) -> tuple[LatencyModel, bool]:
    """The latency model of ``model`` on ``cfg`` from the cache, else ``build`` it and cache it.

    Returns:
        The model and whether it came from the cache (then nothing was measured).
    """
    from dataclasses import replace

    key = cache_key(model, example, cfg)
    found = load_cached(key)
    if found is not None:
        logger.info("latency model from the cache: %s", cache_path(key))
        return found, True
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        found = load_cached(key)  # another process may have built it while we waited
        if found is not None:
            return found, True
        built = replace(build(model, example, cfg), key=key)
        write_json_atomic(path, built.to_dict())
    logger.info("latency model cached in %s", path)
    return built, False
