"""The whole torchvision detector as ONNX, beside its trunk, verified on boxes, scores and labels.

``recede export`` of a ``torchvision:<detector>`` model writes the trunk (backbone, FPN, dense
heads: ``pipeline.models.detection``) as ``model.onnx`` like any model with several outputs.
Where torch's ONNX exporter (the TorchScript one, opset 17) can also export the whole detector
(image transform, anchors, box decoding, NMS, ROI heads: on torch 2.14 and torchvision 0.29 it
exported Faster R-CNN, RetinaNet and SSDlite in 18-35 s at 256 px on this project's CPU), it is
written as ``detector.onnx`` with the pruned backbone inside: input ``images`` (one
``[3, H, W]`` image of the export size), outputs ``output.0.boxes``, ``output.0.scores``,
``output.0.labels`` (and ``masks``, ``keypoints`` ...) as torchvision returns them. When the
exporter fails, the trunk alone is shipped and the log says why.

**What can be compared.** The number of detections is data-dependent: a score that sits on the
threshold in one runtime and just under it in the other changes the count. ONNX Runtime and
PyTorch are run on fixed images and the detections both runtimes must agree on are compared
(:func:`comparable`), each output against its own scale under :data:`TOLERANCE` (labels too: a
wrong label is off by at least 1, far above the bound), and the check's cause says how many
were compared when the counts differed. A wrong-input effect is how far the rows differ from each
other, so a detector answering one box for everything is ``insensitive``.

**Untrained detectors.** An untrained detector scores every box below its threshold (0.05), so
there is nothing to compare and its own check is ``insensitive``. As for the calibrated twin of
``pipeline.core.checks``, a twin (:func:`twin`: the score thresholds at 0, same graph, decoding
and NMS; for an untrained detector every layer scaled to unit output spread and the BNs
calibrated on the fixed images, :func:`conditioned`) is then exported to a temporary folder and
verified the same way; if it is ``ok`` the verdict is ``twin-ok``. BN calibration alone is not
enough for a detector: its FPN, box head and predictor have no BN, so the twin's scores
saturated at 0 and 1 and tied (Faster R-CNN 320: 13 detections, none comparable).
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.atomic import atomic_path
from pipeline.core.tolerance import Tolerance

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.core.checks import Check

logger = logging.getLogger(__name__)

FILE = "detector.onnx"
TOLERANCE = Tolerance(1e-3, 1e-6, "fp32")
"""The whole detector's bound: ten times the fp32 policy's, because ONNX Runtime's RoiAlign and
resize are other implementations of torchvision's ops, not the same sums in another order:
Faster R-CNN (mobilenet_v3_large_320_fpn, 256 px) scored 2.3e-4 apart on boxes both kept."""
WHAT = "onnx-detector"
IMAGES = 2  # fixed images the whole detector is verified on


def prepared(trunk: nn.Module, size: tuple[int, int], *, threshold: float | None = None) -> Any:
    """A copy of ``trunk.detector`` in eval mode that keeps images of ``size`` at that size
    (the R-CNN, RetinaNet and FCOS transforms resize to their own ``min_size`` otherwise);
    ``threshold`` replaces its score thresholds."""
    detector = copy.deepcopy(trunk.detector).cpu().eval()
    transform = getattr(detector, "transform", None)
    if transform is not None and getattr(transform, "fixed_size", None) is None:
        transform.min_size, transform.max_size = (min(size),), max(size)
    if threshold is not None:
        for owner in (detector, getattr(detector, "roi_heads", None)):
            if owner is not None and hasattr(owner, "score_thresh"):
                owner.score_thresh = threshold
    return detector


def images(size: tuple[int, int], count: int = IMAGES) -> list[torch.Tensor]:
    """Fixed images in [0, 1] (the detectors normalise them themselves)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, *size, generator=g) for _ in range(count)]


def _export(detector: Any, image: torch.Tensor, path: Path, opset: int) -> list[str]:
    """Write the whole detector to ``path``; returns its output names."""
    import onnx
    import torch

    from pipeline.core.outputs import flatten

    with torch.no_grad():
        names = list(flatten(detector([image])))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's and torchvision's trace warnings
        torch.onnx.export(
            detector, ([image],), buffer, input_names=["images"], output_names=names,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return names


def _compared(path: Path, detector: Any, batch: list[torch.Tensor]) -> tuple[list, str]:
    """Per image, (PyTorch, ONNX Runtime) detections that can be compared (:func:`comparable`),
    and a note on what was left out."""
    import onnxruntime as ort
    import torch

    from pipeline.core.outputs import as_arrays

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    pairs, notes = [], []
    for k, image in enumerate(batch):
        with torch.no_grad():
            want = as_arrays(detector([image]))
        got = dict(zip(names, session.run(None, {"images": image.numpy()}), strict=True))
        want, got, note = comparable(want, {m: a.astype("float64") for m, a in got.items()})
        pairs.append((want, got))
        notes += [f"image {k}: {note}"] if note else []
    return pairs, "; ".join(notes)


def comparable(want: dict[str, Any], got: dict[str, Any]) -> tuple[dict, dict, str]:
    """The detections of ``want`` (PyTorch) and ``got`` (ONNX Runtime) that can be compared, in
    the same order, and a note on what was left out.

    Both are sorted by score, but scores that tie within the fp32 bound sort either way, and a
    count cut (score threshold, ``detections_per_img``) can fall either side of a tie. So rows
    scoring within the bound of the lowest score both runtimes kept are left out (the other
    runtime may have cut them), and each remaining PyTorch row is paired with the closest ONNX
    row (boxes, scores and labels, each against its own scale): pairing can only shrink a
    correct graph's error, and a wrong box has no close partner.
    """
    import numpy as np

    from pipeline.core.tolerance import tolerance_for

    counts = sorted({len(a) for a in (*want.values(), *got.values())})
    n, keep = counts[0], counts[0]
    scores = next((want[m][:n].ravel() for m in want if m.endswith(".scores")), None)
    if scores is not None and n:
        bound = tolerance_for("fp32").bound(float(np.abs(scores).max()))
        keep = int((scores > scores[n - 1] + bound).sum())
    key = [m for m in want if m.endswith((".boxes", ".scores", ".labels"))] or list(want)
    order = _pairing({m: want[m][:keep] for m in key}, {m: got[m][:n] for m in key})
    picked = {m: got[m][order] if len(got[m]) >= n else got[m][:0] for m in got}
    note = f"{'/'.join(map(str, counts))} detections, compared {keep}" if keep < counts[-1] else ""
    return {m: a[:keep] for m, a in want.items()}, picked, note


def _pairing(want: dict[str, Any], got: dict[str, Any]) -> list[int]:
    """For each row of ``want``, the closest unpaired row of ``got`` (greedy, in score order)."""
    import numpy as np

    rows, cols = len(next(iter(want.values()))), len(next(iter(got.values())))
    if not rows:
        return []
    cost = np.zeros((rows, cols))
    for m, a in want.items():
        scale = max(float(np.abs(a).max(initial=0.0)), 1e-12)
        w, g = a.reshape(rows, -1), got[m].reshape(cols, -1)
        cost = np.maximum(cost, np.abs(w[:, None, :] - g[None, :, :]).max(axis=2) / scale)
    order: list[int] = []
    for i in range(rows):
        cost_i = cost[i].copy()
        cost_i[order] = np.inf
        order.append(int(cost_i.argmin()))
    return order


def _verify(path: Path, detector: Any, size: tuple[int, int]) -> Check:
    from pipeline.core.output_checks import judge_outputs

    pairs, note = _compared(path, detector, images(size))
    merged_want = {m: _rows([want[m] for want, _ in pairs]) for m in pairs[0][0]}
    merged_got = {m: _rows([got[m] for _, got in pairs]) for m in pairs[0][1]}
    check = judge_outputs(WHAT, [(merged_want, merged_got)], TOLERANCE, path=FILE)
    if merged_want and all(len(a) == 0 for a in merged_want.values()):
        cause = "no detections on the fixed images (every score under the threshold): nothing to compare"
        check = replace(check, verdict="insensitive", cause=cause)
    if note:
        check = replace(check, cause=f"{check.cause}; {note}" if check.cause else note)
    return check


def _rows(arrays: list) -> Any:
    """Every image's detections as rows of one array (``[n, 4]`` boxes, ``[n, 1]`` scores)."""
    import numpy as np

    return np.concatenate([a.reshape(len(a), int(np.prod(a.shape[1:]))) for a in arrays])


def twin(trunk: nn.Module, size: tuple[int, int]) -> Any:
    """The whole detector's twin (module docstring): score thresholds at 0 and, where the
    detector is untrained, :func:`conditioned` on the fixed images."""
    from pipeline.core.checks import untrained_bns

    detector = prepared(trunk, size, threshold=0.0)
    if untrained_bns(trunk):
        conditioned(detector, images(size, 4))
    return detector


def conditioned(detector: nn.Module, batch: list[torch.Tensor]) -> None:
    """Scale, in place, every convolution and linear layer of ``detector`` so its output spreads
    with unit standard deviation on ``batch`` (centred at 0 where it has a bias), and set every
    BN's statistics to the batch's.

    One forward pass: each layer is scaled (weight by ``1/std``, bias shifted by the output's
    mean and scaled) the first time it runs, before the layers after it see its output, and the
    BNs (training mode, ``momentum=None``) take their statistics from the scaled outputs. The graph is unchanged;
    only its constants differ from the detector's, which is what a twin may differ in. Without
    it, an untrained detector's scores either sit on one value (its BNs at mean 0, var 1) or
    saturate at 0 and 1 (BNs calibrated, but the unnormalised FPN, box head and predictor
    grow the logits), and scores that tie within the bound cannot be compared.
    """
    import torch
    from torch import nn

    from pipeline.core.checks import calibrating_bns_

    seen: set[int] = set()

    def unit_spread(module: nn.Module, _: Any, out: Any) -> Any:
        if id(module) in seen or not isinstance(out, torch.Tensor) or out.numel() < 2:
            return None
        seen.add(id(module))
        spread = float(out.std())
        if not (spread > 0 and spread < float("inf")):
            return None
        shift = float(out.mean()) if module.bias is not None else 0.0
        module.weight.div_(spread)
        if module.bias is not None:
            module.bias.sub_(shift).div_(spread)
        return (out - shift) / spread

    layers = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [
        m.register_forward_hook(unit_spread) for m in detector.modules() if isinstance(m, layers)
    ]
    calibrating_bns_(detector)
    try:
        with torch.no_grad():
            detector(batch)
    finally:
        for h in handles:
            h.remove()
        detector.eval()


def export_detector(
    trunk: nn.Module, size: tuple[int, int], out: Path, *, opset: int
) -> Check | None:
    """Export and verify the whole detector of ``trunk`` into ``out / FILE``; None (nothing
    written) where torch's exporter cannot export it. See the module docstring."""
    from pipeline.core.checks import with_twin

    start, path = time.perf_counter(), out / FILE
    detector = prepared(trunk, size)
    try:
        _export(detector, images(size, 1)[0], path, opset)
    except Exception as err:  # noqa: BLE001 - the exporter fails in many ways; the trunk still ships
        path.unlink(missing_ok=True)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        logger.warning(
            "torch's ONNX exporter cannot export the whole %s (%s: %s); only the trunk "
            "(model.onnx) is shipped", type(detector).__name__, type(err).__name__, first,
        )  # fmt: skip
        return None
    check = _verify(path, detector, size)
    if check.verdict == "insensitive":
        other = twin(trunk, size)
        with tempfile.TemporaryDirectory(prefix="recede-detector-") as tmp:
            _export(other, images(size, 1)[0], Path(tmp, FILE), opset)
            twin_check = _verify(Path(tmp, FILE), other, size)
        check = with_twin(check, replace(twin_check, path=""))
        if check.verdict == "twin-ok":
            check = replace(check, cause=(
                "no detections on the fixed images above the detector's score threshold; "
                "verified on a twin with the score thresholds at 0 (same decoding and NMS; where "
                "the detector is untrained, its layers scaled to unit spread and its BN "
                "statistics calibrated on the fixed images)"
            ))  # fmt: skip
    logger.info("whole detector: %s in %.1f s: %s", path, time.perf_counter() - start, check.line())
    return check
