"""Prune to a latency budget measured on ONNX Runtime: targets against measured and predicted
latency, the latency model's error and cost, and accuracy beside MAC-budget runs.

For each model (the demo's VGG-11 w0.5 and a MobileNetV2-class model, ``latency_models.py``) on
Fashion-MNIST at 28 px, batch 1, ONNX Runtime CPU fp32, one thread, CPU clock:

1. the dense model's p50 (median of ``--repeats`` measurements of ``MODEL_RUNS`` runs each);
2. the latency model, built into an empty cache (its cost) and read again (the cost of a run
   with the cache), with its prediction error on held-out width profiles beside two other
   predictors on the same profiles: MACs calibrated the same way (affine in MACs on the same fit
   profiles), and the layer tables' sum uncalibrated;
3. for every target share (``--targets``, of the dense model's latency as the latency model
   predicts it, i.e. in its own frame): ``recede run`` with ``train.target_cost: latency`` and
   ``train.target_latency_ms`` = share x that, and a
   MAC-budget run keeping the same share of the MACs (``train.target_cost: macs``, cut at the
   receded level ``train.receded_below``); each pruned ONNX file measured ``--repeats`` times
   (median and spread), with its accuracy.

Runs read the data through ``fast_data`` (images decoded once, accuracy on the first
``--test-limit`` test images), not ``recede run``'s own loader: the same images, minutes per
run instead of a quarter of an hour on 2 shared cores.

Results are written after every run (``--out``, default
``benchmarks/results/latency_budget.json``); ``--markdown`` renders the tables of
``benchmarks/RESULTS.md`` and ``docs/results.md`` from the JSON.

    PYTHONPATH=. python benchmarks/latency_budget.py                  # the full benchmark
    PYTHONPATH=. python benchmarks/latency_budget.py --quick          # digits, a smoke test
    PYTHONPATH=. python benchmarks/latency_budget.py --markdown benchmarks/results/latency_budget_*.json \\
        --plot benchmarks/results/latency_budget_pareto.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.config import LatencyConfig, RunConfig, load_config  # noqa: E402
from pipeline.core.atomic import write_json_atomic  # noqa: E402
from pipeline.core.environment import environment  # noqa: E402

logger = logging.getLogger("latency_budget")

MODELS = {
    "vgg": ["model.name=vgg", "model.depth=11", "model.width=0.5"],
    "mobilenet_v2": ["model.name=latency_models:mobilenet_v2_small"],
}
DEPLOYMENT = LatencyConfig()  # onnxruntime cpu fp32, batch 1, 1 thread, cpu clock


def base_overrides(args: argparse.Namespace) -> list[str]:
    data = (
        ["data.name=digits", "data.image_size=16", "data.train_limit=256"]
        if args.quick
        else [
            "data.name=fashion_mnist",
            "data.image_size=28",
            f"data.train_limit={args.train_limit}",
            f"data.batch_size={args.batch_size}",
        ]
    )
    return [
        *data,
        f"train.epochs={args.epochs}",
        f"prune.finetune_epochs={args.finetune_epochs}",
        "bench.batches=[1]",
        "bench.threads=1",
        "bench.clock=cpu",
        "bench.runs=50",
        "export.int8.enabled=false",  # the deployment timed here is fp32
    ]


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}  # fmt: skip


def p50_repeats(paths: list[Path], repeats: int) -> list[dict[str, Any]]:
    """Per ONNX file, ``repeats`` measurements (each ``MODEL_RUNS`` runs, the files timed in
    the same alternating blocks): the p50 of every run (what a user waits, load included) and
    the quietest block's median (``quietest_ms``), each as median and spread of the repeats."""
    from pipeline.bench.latency_profiles import median_ms, quietest_ms, time_onnx_ms

    both = lambda blocks: (median_ms(blocks), quietest_ms(blocks))  # noqa: E731
    runs = [time_onnx_ms(paths, DEPLOYMENT, statistic=both) for _ in range(repeats)]
    out = []
    for i in range(len(paths)):
        out.append(
            _summary([r[i][0] for r in runs]) | {"quietest": _summary([r[i][1] for r in runs])}
        )
    return out


def dense_p50(cfg: RunConfig, data, repeats: int, tmp: Path) -> dict[str, Any]:
    from pipeline.bench.latency_profiles import export_for_timing
    from pipeline.models.zoo import build_model
    from pipeline.run.latency_budget import dense_example

    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    path = export_for_timing(model, dense_example(data.input_shape), tmp / "dense.onnx")
    return p50_repeats([path], repeats)[0]


def predictors(cfg: RunConfig, data, lm) -> dict[str, Any]:
    """Held-out error of three predictors on the latency model's own profiles."""
    from pipeline.bench.latency_profiles import _profiles, fit_calibration, profile_model
    from pipeline.graph.channel_graph import build_channel_graph
    from pipeline.graph.costs import count_macs
    from pipeline.models.zoo import build_model
    from pipeline.run.latency_budget import dense_example

    model = build_model(
        cfg.model, num_classes=data.num_classes, in_channels=data.in_channels
    ).eval()
    example = dense_example(data.input_shape)
    graph = build_channel_graph(model, example[:1])
    macs = [
        count_macs(profile_model(model, graph, d), data.input_shape)
        for _, _, d in _profiles(graph, lm.align)
    ]
    measured = [p.measured_ms for p in lm.profiles]
    fit = [i for i, p in enumerate(lm.profiles) if p.role == "fit"]
    held = [i for i, p in enumerate(lm.profiles) if p.role == "held-out"]
    offset, scale = fit_calibration([macs[i] for i in fit], [measured[i] for i in fit])

    def errors(pred):
        return {lm.profiles[i].label: pred[i] / measured[i] - 1 for i in held}

    return {
        "tables_calibrated": errors([p.predicted_ms for p in lm.profiles]),
        "macs_calibrated": errors([offset + scale * m for m in macs]),
        "tables_uncalibrated": errors([p.table_ms + lm.overhead_ms for p in lm.profiles]),
    }


def fast_data(test_limit: int):
    """``recede run``'s data loader, replaced for this benchmark: images decoded once into
    tensors (``quality_data.load_tensor_data``) and the test set cut to its first
    ``test_limit`` images, so a run on 2 shared cores takes minutes, not a quarter of an hour.
    Every accuracy here is on those ``test_limit`` images."""
    import dataclasses

    from quality_data import load_tensor_data
    from torch.utils.data import DataLoader, TensorDataset

    def load(cfg, seed=0):
        data = load_tensor_data(cfg, seed=seed)
        x, y = data.test.dataset[:test_limit]
        return dataclasses.replace(data, test=DataLoader(TensorDataset(x, y), data.test.batch_size))

    return load


def one_run(overrides: list[str], out: Path, repeats: int) -> dict[str, Any]:
    from pipeline.run.pipeline import run_pipeline

    cfg = load_config("configs/fashion_mnist.yaml", overrides)
    start = time.perf_counter()
    report = run_pipeline(cfg, out, force=True)
    seconds = time.perf_counter() - start
    data = report.to_dict()
    cell = {
        "seconds": seconds,
        "accuracy": data["pruned"]["accuracy"],
        "dense_accuracy": data["dense"]["accuracy"],
        "macs": data["pruned"]["macs"],
        "dense_macs": data["dense"]["macs"],
        "budget": data["budget"],
    }
    dense, pruned = p50_repeats([out / "dense.onnx", out / "pruned.onnx"], repeats)
    ratios = [
        p / d
        for p, d in zip(pruned["quietest"]["values"], dense["quietest"]["values"], strict=True)
    ]
    cell |= {"p50": pruned, "dense_p50": dense, "ratio_to_dense": statistics.median(ratios)}
    logger.info(
        "%s: %.1f s, accuracy %.4f, p50 %.4g ms",
        out.name,
        seconds,
        cell["accuracy"],
        cell["p50"]["median"],
    )
    return cell


def model_section(name: str, args: argparse.Namespace, results: dict, out: Path) -> None:
    from pipeline.run.latency_budget import latency_model_for_run

    base = [*base_overrides(args), *MODELS[name]]
    section = results["models"].setdefault(name, {"runs": {}})
    with tempfile.TemporaryDirectory(prefix="recede-latency-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["RECEDE_CACHE"] = str(tmp / "cache")  # an empty cache: the build is timed
        cfg = load_config("configs/fashion_mnist.yaml", base)
        data = fast_data(args.test_limit)(cfg.data, seed=cfg.train.seed)
        section["dense_p50"] = dense_p50(cfg, data, args.repeats, tmp)
        probe = load_config(
            "configs/fashion_mnist.yaml",
            [
                *base,
                "train.target=null",
                "train.target_cost=latency",
                "train.target_latency_ms=1e-9",
            ],
        )
        start = time.perf_counter()
        lm, _ = latency_model_for_run(probe, data)
        section["build_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        _, hit = latency_model_for_run(probe, data)
        section["cached_seconds"], section["cache_hit"] = time.perf_counter() - start, hit
        section["latency_model"] = {
            "dense_ms": lm.dense_ms,
            "offset_ms": lm.offset_ms,
            "scale": lm.scale,
            "table_error": lm.table_error,
            "profiles": [p.__dict__ for p in lm.profiles],
            "pieces": sum(len(t.ms) * len(t.ms[0]) for t in lm.layers),
        }
        section["predictors"] = predictors(cfg, data, lm)
        write_json_atomic(out, results)
        # targets in the latency model's frame (its dense prediction): a load change between
        # the dense p50 above and the calibration would otherwise move every target
        dense = lm.dense_ms
        section["reference_ms"] = dense
        for share in args.targets:
            target = share * dense
            lat = [
                *base,
                "train.target=null",
                "train.target_cost=latency",
                f"train.target_latency_ms={target!r}",
            ]
            macs = [
                *base,
                f"train.target={1 - share!r}",
                "train.target_cost=macs",
                "prune.threshold=0.01",
            ]
            runs = section["runs"].setdefault(f"{share:g}", {"target_ms": target})
            for method, overrides in (("latency", lat), ("macs", macs)):
                if method in args.methods:
                    where = tmp / f"{name}-{method}-{share:g}"
                    runs[method] = one_run(overrides, where, args.repeats)
                    write_json_atomic(out, results)


def _range(p: dict[str, Any]) -> str:
    return f"{p['median']:.4f} ({p['min']:.4f}-{p['max']:.4f})"


def _targets_table(s: dict[str, Any]) -> list[str]:
    lines = [
        "| target share | target ms | predicted ms | p50 ms: median (min-max) of 5 | quietest "
        "block ms | p50 / target | quietest / target | pruned/dense / share | predicted / "
        "quietest | accuracy | MAC-budget run: p50 ms | its pruned/dense | its accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for share, r in s["runs"].items():
        lat, mac = r.get("latency"), r.get("macs")
        if lat is None:
            continue
        b, p, q = lat["budget"]["latency"], lat["p50"], lat["p50"]["quietest"]
        row = [
            f"{float(share):.0%}",
            f"{r['target_ms']:.4f}",
            f"{b['predicted_ms']:.4f}",
            _range(p),
            _range(q),
            f"{p['median'] / r['target_ms']:.2f}",
            f"{q['median'] / r['target_ms']:.2f}",
            f"{lat['ratio_to_dense'] / float(share):.2f}",
            f"{b['predicted_ms'] / q['median']:.2f}",
            f"{lat['accuracy']:.2%}",
        ]
        row += (
            [_range(mac["p50"]), f"{mac['ratio_to_dense']:.3f}", f"{mac['accuracy']:.2%}"]
            if mac
            else ["—", "—", "—"]
        )
        lines.append("| " + " | ".join(row) + " |")
    return lines


def mac_accuracy_at(s: dict[str, Any], ratio: float) -> float | None:
    """The MAC-budget runs' accuracy at a pruned/dense latency ratio, interpolated linearly
    between the two runs around it (None outside their range). Ratios to the dense model timed
    beside each, not absolute ms, so the load at each measurement cancels."""
    points = sorted(
        (r["macs"]["ratio_to_dense"], r["macs"]["accuracy"])
        for r in s["runs"].values()
        if r.get("macs")
    )
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= ratio <= x1:
            return y0 + (y1 - y0) * (ratio - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return None


def _equal_latency_table(s: dict[str, Any]) -> list[str]:
    lines = [
        "| target | latency run: ratio to dense | its accuracy | MAC-budget accuracy at that ratio | difference |",
        "|---:|---:|---:|---:|---:|",
    ]
    for share, r in s["runs"].items():
        lat = r.get("latency")
        if lat is None:
            continue
        mac = mac_accuracy_at(s, lat["ratio_to_dense"])
        cells = (
            ["outside the MAC runs' range", "—"]
            if mac is None
            else [f"{mac:.2%}", f"{(lat['accuracy'] - mac) * 100:+.2f} pp"]
        )
        lines.append(
            f"| {float(share):.0%} | {lat['ratio_to_dense']:.3f} | {lat['accuracy']:.2%} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _predictors_table(s: dict[str, Any]) -> list[str]:
    pred = s["predictors"]
    keys = ("tables_calibrated", "macs_calibrated", "tables_uncalibrated")
    lines = [
        "| held-out profile | tables, calibrated (recede) | MACs, calibrated | tables alone |",
        "|---|---:|---:|---:|",
    ]
    for label in pred["tables_calibrated"]:
        lines.append(f"| {label} | " + " | ".join(f"{pred[k][label]:+.1%}" for k in keys) + " |")
    return lines


def provenance(results: dict) -> str:
    """The command, machine, date and load average (1/5/15 min) at the start and end."""
    env = results["environment"]
    load = lambda key: "/".join(f"{v:.1f}" for v in results.get(key) or ()) or "n/a"  # noqa: E731
    return (
        f"`{results['command']}` on {env['cpu']} (no GPU), ONNX Runtime {env['onnxruntime']}, "
        f"torch {env['torch']}, {results['date']}; load average {load('load_average_start')} "
        f"at the start, {load('load_average_end')} at the end."
    )


def markdown(results: dict) -> str:
    """The results tables (targets against predicted and measured; predictors; accuracy)."""
    lines = [provenance(results), ""]
    for name, s in results["models"].items():
        first = next(iter(s["runs"].values()), {}).get("latency")
        share = (
            ""
            if first is None
            else (
                f" ({s['build_seconds'] / (first['seconds'] + s['build_seconds']):.0%} of a run "
                f"that builds it: {first['seconds'] + s['build_seconds']:.0f} s)"
            )
        )
        lines += [
            f"### {name}",
            "",
            f"Dense p50 {_range(s['dense_p50'])} ms, quietest block "
            f"{_range(s['dense_p50']['quietest'])} ms; predicted {s['reference_ms']:.4f} ms (the "
            "targets' reference). Latency model: "
            f"{s['latency_model']['pieces']} pieces and 9 profiles, built in "
            f"{s['build_seconds']:.1f} s{share}, read from the cache in "
            f"{s['cached_seconds']:.2f} s (nothing measured); largest held-out error "
            f"{s['latency_model']['table_error']:.1%}.",
            "",
            *_targets_table(s),
            "",
            *_equal_latency_table(s),
            "",
            *_predictors_table(s),
            "",
        ]
    return "\n".join(lines)


def plot_pareto(results: dict, path: Path) -> Path:
    """Accuracy against measured latency (pruned/dense p50 ratio), latency-budget runs beside
    MAC-budget runs, one panel per model: the Pareto front of each method."""
    from pipeline.run.plots import new_figure, save_figure

    models = list(results["models"].items())
    fig = new_figure(5.0 * len(models), 3.6)
    for ax, (name, s) in zip(fig.subplots(1, len(models), squeeze=False)[0], models, strict=True):
        for method, marker in (("latency", "o"), ("macs", "s")):
            points = sorted(
                (r[method]["ratio_to_dense"], r[method]["accuracy"] * 100)
                for r in s["runs"].values()
                if r.get(method)
            )
            if points:
                label = "latency budget" if method == "latency" else "MAC budget"
                ax.plot(*zip(*points, strict=True), marker=marker, label=label)
        ax.set(title=name, xlabel="measured p50, pruned / dense (batch 1, ORT CPU, 1 thread)",
               ylabel="accuracy (%)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.4, 0.25])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", default=["latency", "macs"], choices=["latency", "macs"],
        help="budget runs per target: latency, and the MAC-budget run beside it",
    )  # fmt: skip
    parser.add_argument("--test-limit", type=int, default=1000, help="test images per accuracy")
    parser.add_argument("--quick", action="store_true", help="digits at 16 px, one target")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_budget.json"))
    parser.add_argument(
        "--markdown", type=Path, nargs="+", help="render these results JSON files and exit"
    )
    parser.add_argument("--plot", type=Path, help="with --markdown: also write the Pareto plot")
    args = parser.parse_args()
    if args.markdown:
        files = [json.loads(path.read_text()) for path in args.markdown]
        results = {**files[0], "models": {k: v for f in files for k, v in f["models"].items()}}
        print(markdown(results))
        if args.plot:
            plot_pareto(results, args.plot)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.quick:
        args.models, args.targets, args.epochs, args.finetune_epochs = ["vgg"], [0.5], 1, 0
    import pipeline.train.stage

    pipeline.train.stage.load_data = fast_data(args.test_limit)  # what open_training calls
    results = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "environment": environment(),
        "deployment": DEPLOYMENT.__dict__,
        "models": {},
    }
    for name in args.models:
        model_section(name, args, results, args.out)
    results["load_average_end"] = os.getloadavg()
    write_json_atomic(args.out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
