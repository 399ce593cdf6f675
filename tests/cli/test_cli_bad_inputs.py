"""Every bad input through the CLI exits 2 with a message naming what to fix, and changes nothing.

Each case runs ``pipeline.cli.main.main`` in-process (one runs the real console entry in a
subprocess), asserts the exit code and a fragment of stderr, and compares a snapshot of every
file under the test folder (hidden ones included: sizes and mtimes) before and after.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli.main import main

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
LAYER = ["--scope", "layer"]  # an untrained model's tied importances have no global ranking


def raising_factory(num_classes: int):
    raise RuntimeError(f"cannot build with {num_classes} classes")


def list_factory():
    return [1, 2]


def exiting_factory(num_classes: int):
    raise SystemExit(0)  # would have made `recede prune` exit 0 having written nothing


NOT_CALLABLE = 42


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/recede-pwned",))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file and folder below ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src") / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def model_dir(pruned, tmp_path) -> Path:
    """A private copy of a pruned model folder, to damage."""
    return Path(shutil.copytree(pruned, tmp_path / "model"))


# Advice that only a Python caller can follow: keyword arguments, dotted module paths, calls of
# library functions. A command-line user needs flags, keys and commands instead.
PYTHON_API_ADVICE = re.compile(
    r"\b\w+=(True|False)\b|\bpipeline(\.\w+){2,}|\btorch\.save\(|\bcall \w+[.(]|Polariser"
)


def python_api_advice(err: str) -> list[str]:
    """The Python-API advice in ``err``, besides a shell command given to run as written."""
    return [m.group(0) for m in PYTHON_API_ADVICE.finditer(re.sub(r'python -c "[^"]*"', "", err))]


def assert_refused(tmp_path, capsys, argv, fragment, *, code=2, absent=()):
    """Run ``argv``; assert exit code, stderr fragment, an unchanged tree and absent words,
    and that the message advises flags, keys or commands, not Python calls."""
    before = snapshot(tmp_path)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert fragment in err, err
    for word in absent:
        assert word not in err, err
    assert "Traceback" not in err
    assert python_api_advice(err) == [], err
    assert snapshot(tmp_path) == before
    return err


# --- prune: flags -----------------------------------------------------------------------------

FLAG_CASES = {
    "num_classes_negative": (["--num-classes", "-5"], "--num-classes: expected an integer"),
    "num_classes_zero": (["--num-classes", "0"], "--num-classes: expected an integer in [1"),
    "num_classes_text": (["--num-classes", "ten"], "got 'ten'"),
    "threshold_word": (["--threshold", "foo"], "--threshold: expected 'auto', 'ratio'"),
    "threshold_negative": (["--threshold", "-1"], "argument --threshold"),
    "threshold_nan": (["--threshold", "nan"], "argument --threshold"),
    "ratio_above_one": (["--ratio", "1.5"], "--ratio: expected a number in [0.0, 1.0)"),
    "ratio_one": (["--ratio", "1"], "argument --ratio"),
    "ratio_inf": (["--ratio", "inf"], "argument --ratio"),
    "min_channels_zero": (["--min-channels", "0"], "argument --min-channels"),
    "round_to_zero": (["--round-to", "0"], "argument --round-to"),
    "scope_unknown": (["--scope", "wide"], "argument --scope"),
    "scope_layer_with_threshold": (
        ["--scope", "layer", "--threshold", "auto"],
        "--scope layer drops a ratio from every layer, so it needs --threshold ratio",
    ),
    "shape_three_dims": (["--input-shape", "3,16,16"], "--input-shape: expected N,C,H,W"),
    "shape_zero": (["--input-shape", "1,3,0,16"], "argument --input-shape"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_prune_flag_out_of_range(case, tmp_path, capsys):
    extra, fragment = FLAG_CASES[case]
    assert_refused(
        tmp_path, capsys, ["prune", *TINY, *extra, "--out", str(tmp_path / "o")], fragment
    )


MODEL_CASES = {
    "factory_raises": (
        ["--model", f"{__name__}:raising_factory"],
        "building it raised RuntimeError: cannot build with 1000 classes",
    ),
    "factory_returns_list": (["--model", f"{__name__}:list_factory"], "expected an nn.Module"),
    "factory_not_importable": (["--model", "no_such_pkg.nets:build"], "cannot import"),
    "factory_exits": (["--model", f"{__name__}:exiting_factory"], "called sys.exit(0)"),
    "factory_not_callable": (["--model", f"{__name__}:NOT_CALLABLE"], "is a int, not a callable"),
    # Anything importing a user module raises is a ModelError naming it (a SyntaxError traced back)
    "module_syntax_error": (
        ["--model", "recede_bad_syntax:build"],
        "recede_bad_syntax.py, line 2: SyntaxError",
    ),
    "module_raises_at_import": (
        ["--model", "recede_raises_at_import:build"],
        "importing recede_raises_at_import raised KeyError: 'CUDA_HOME'",
    ),
    "module_exits_at_import": (
        ["--model", "recede_exits_at_import:build"],
        "importing recede_exits_at_import raised SystemExit: 3",
    ),
    "unknown_model": (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    "unknown_torchvision": (["--model", "torchvision:nosuch"], "unknown torchvision model"),
    "input_too_small": (
        ["--model", "vgg", "--input-shape", "1,3,4,4"],
        "--input-shape: the model cannot take an input of shape (1, 3, 4, 4)",
    ),
    "wrong_channels": (["--input-shape", "1,1,16,16"], "cannot take an input of shape"),
    "no_batchnorm": (["--model", "torchvision:alexnet", "--input-shape", "1,3,64,64"], "BatchNorm"),
}


USER_MODULES = {
    "recede_bad_syntax": "import torch\ndef build(:\n    pass\n",
    "recede_raises_at_import": "import os\nHOME = os.environ['CUDA_HOME']\n",
    "recede_exits_at_import": "import sys\nsys.exit(3)\n",
}


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory):
    """Broken user model modules, importable for the module's tests (beside, not in, tmp_path)."""
    folder = tmp_path_factory.mktemp("user_modules")
    for name, code in USER_MODULES.items():
        (folder / f"{name}.py").write_text(code)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_prune_model_that_cannot_be_built(case, tmp_path, capsys, user_modules):
    extra, fragment = MODEL_CASES[case]
    argv = ["prune", *TINY, *extra, "--out", str(tmp_path / "o")]
    assert_refused(tmp_path, capsys, argv, fragment)


def test_prune_needs_a_model_source(tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["prune", "--out", str(tmp_path / "o")], "needs --from DIR")


def test_prune_model_without_input_shape(tmp_path, capsys):
    argv = ["prune", "--model", "vgg", "--out", str(tmp_path / "o")]
    assert_refused(tmp_path, capsys, argv, "--model SPEC with --input-shape")


# --- prune: output folder ---------------------------------------------------------------------


def test_out_is_an_existing_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    argv = ["prune", *TINY, "--out", str(tmp_path / "taken")]
    assert_refused(tmp_path, capsys, argv, "is an existing file, expected a folder")


def test_out_below_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    argv = ["prune", *TINY, "--out", str(tmp_path / "taken" / "sub")]
    assert_refused(tmp_path, capsys, argv, "is a file, expected a folder")


def test_out_holds_foreign_files(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    argv = ["prune", *TINY, "--out", str(tmp_path / "o")]
    assert_refused(tmp_path, capsys, argv, "pass --force to replace its contents")


def test_shapes_num_classes_that_the_weights_contradict(tmp_path, capsys):
    """num_classes 10 -> 7 in shapes.json was accepted by prune --from and carried on."""
    src = tmp_path / "src"
    assert (
        main(
            [
                "prune",
                "--model",
                "resnet20",
                "--num-classes",
                "10",
                *TINY[2:],
                *LAYER,
                "--out",
                str(src),
            ]
        )
        == 0
    )
    shapes = json.loads((src / "shapes.json").read_text())
    shapes["spec"]["num_classes"] = 7
    (src / "shapes.json").write_text(json.dumps(shapes))
    argv = ["prune", "--from", str(src), "--out", str(tmp_path / "o")]
    # The head is never pruned, so its 10 outputs contradict the 7 classes the spec builds
    assert_refused(tmp_path, capsys, argv, "shapes.json: key 'shapes.fc.out_features' must be an integer in [1, 7]")


def test_out_where_no_file_can_be_created(tmp_path, capsys):
    """root passes os.access on /proc, where nothing can be created: refused before the prune."""
    argv = ["prune", *TINY, "--out", "/proc/nope"]
    assert_refused(tmp_path, capsys, argv, "--out /proc/nope: cannot write in /proc")


def test_prune_refuses_to_overwrite_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "report.json", "manifest.json"):
        (run / name).write_text("{}")
    assert_refused(
        tmp_path, capsys, ["prune", *TINY, "--out", str(run)], "holds a `recede run` folder"
    )


# --- damaged model folders (prune --from, export, bench, inspect --from) -----------------------


def _truncate(folder: Path) -> None:
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])


def _save(obj):
    def write(folder: Path) -> None:
        torch.save(obj, folder / "model.pt")

    return write


def _evil(folder: Path) -> None:
    (folder / "model.pt").write_bytes(pickle.dumps(_Evil()))


def _legacy_empty(folder: Path) -> None:
    (folder / "shapes.json").unlink()
    (folder / "manifest.json").write_text("{}")


def _spec_model_a_name(folder: Path) -> None:
    shapes = json.loads((folder / "shapes.json").read_text())
    shapes["spec"]["model"] = "resnet20"  # a name where the model config belongs
    (folder / "shapes.json").write_text(json.dumps(shapes))


DAMAGE = {
    # the message used to be "config must be a mapping, got 'resnet20'": no file, no key
    "spec_model_not_a_mapping": (
        _spec_model_a_name,
        "shapes.json: key 'spec.model' must be a mapping such as {'name': 'resnet20'}, got 'resnet20'",
    ),
    "weights_truncated": (_truncate, "model.pt"),
    "weights_empty": (lambda f: (f / "model.pt").write_bytes(b""), "model.pt is empty"),
    "weights_evil_pickle": (_evil, "refused without running it"),
    "weights_list": (_save([torch.zeros(2)]), "holds a list, expected a state dict"),
    "weights_other_model": (_save(torch.nn.Linear(2, 2).state_dict()), "does not fit"),
    "shapes_empty_object": (
        lambda f: (f / "shapes.json").write_text("{}"),
        "shapes.json is not a shape manifest",
    ),
    "shapes_invalid_json": (
        lambda f: (f / "shapes.json").write_text("{not json"),
        "shapes.json is not valid JSON",
    ),
    "shapes_missing": (lambda f: (f / "shapes.json").unlink(), "no shapes.json"),
    "legacy_manifest_empty": (_legacy_empty, "manifest.json is not a shape manifest"),
    "weights_missing": (lambda f: (f / "model.pt").unlink(), "holds no saved model"),
}


@pytest.mark.parametrize("command", ["prune", "export", "bench", "inspect"])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_model_folder(case, command, model_dir, tmp_path, capsys):
    damage, fragment = DAMAGE[case]
    damage(model_dir)
    argv = {
        "prune": ["prune", "--from", str(model_dir), "--out", str(tmp_path / "o")],
        "export": ["export", str(model_dir)],
        # --force: past the folder's file index (tests/core/test_integrity.py), to the loader's checks
        "bench": ["bench", str(model_dir), "--batches", "1", "--force"],
        "inspect": ["inspect", "--from", str(model_dir)],
    }[command]
    assert_refused(tmp_path, capsys, argv, fragment, absent=("weights_only=False",))
    assert not Path("/tmp/recede-pwned").exists()


# --- export -----------------------------------------------------------------------------------

EXPORT_FLAGS = {
    "atol_negative": (["--atol", "-1"], "--atol: expected a number in (0.0, inf]"),
    "atol_zero": (["--atol", "0"], "argument --atol"),
    "atol_nan": (["--atol", "nan"], "argument --atol"),
    "opset_low": (["--opset", "5"], "--opset: expected an integer in [17"),
    "opset_beyond_the_exporter": (["--opset", "1000"], "--opset: expected an integer in [17, "),
    "format_unknown": (["--format", "tflite"], "invalid choice: 'tflite'"),
    # --int8 was ignored without a word by an ONNX export
    "int8_without_tensorrt": (
        ["--format", "onnx", "--int8"],
        "--int8 builds a TensorRT INT8 engine, and --format onnx makes no TensorRT engine",
    ),
}


@pytest.mark.parametrize("case", sorted(EXPORT_FLAGS))
def test_export_flag_out_of_range(case, model_dir, tmp_path, capsys):
    extra, fragment = EXPORT_FLAGS[case]
    assert_refused(tmp_path, capsys, ["export", str(model_dir), *extra], fragment)


def test_export_tensorrt_without_tensorrt_is_refused_before_onnx(model_dir, tmp_path, capsys):
    from pipeline.export.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is usable here")
    argv = ["export", str(model_dir), "--format", "tensorrt"]
    assert_refused(tmp_path, capsys, argv, "--format tensorrt needs the tensorrt package")
    assert not (model_dir / "model.onnx").exists()


def test_export_into_a_read_only_folder(model_dir, tmp_path, capsys, monkeypatch):
    import pipeline.core.output_folders

    if os.geteuid() == 0:  # root writes anywhere: make the folder report itself read-only
        real = pipeline.core.output_folders._unwritable_reason

        def read_only(folder: Path) -> str | None:
            return "read-only file system" if folder == model_dir else real(folder)

        monkeypatch.setattr(pipeline.core.output_folders, "_unwritable_reason", read_only)
    else:
        model_dir.chmod(0o555)
    try:
        err = assert_refused(
            tmp_path, capsys, ["export", str(model_dir)], f"DIR {model_dir}: cannot write"
        )
    finally:
        model_dir.chmod(0o755)
    assert ".tmp" not in err  # names the folder, not a temporary file


def test_export_missing_folder(tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["export", str(tmp_path / "nothing")], "holds no saved model")


# --- bench ------------------------------------------------------------------------------------


def test_bench_garbage_onnx(model_dir, tmp_path, capsys):
    (model_dir / "model.onnx").write_bytes(b"not an onnx graph")
    argv = ["bench", str(model_dir), "--batches", "1"]
    assert_refused(tmp_path, capsys, argv, "model.onnx is not in the index")
    assert_refused(tmp_path, capsys, [*argv, "--force"], "model.onnx is not a valid ONNX model")


BENCH_FLAGS = {
    "runs_too_few": (["--runs", "4"], "--runs: expected an integer in [5"),
    "threads_zero": (["--threads", "0"], "argument --threads"),
    "threads_huge": (["--threads", "100000"], "--threads: expected an integer in [1, 256]"),
    "batch_zero": (["--batches", "0"], "argument --batches"),
}


@pytest.mark.parametrize("case", sorted(BENCH_FLAGS))
def test_bench_flag_out_of_range(case, model_dir, tmp_path, capsys):
    extra, fragment = BENCH_FLAGS[case]
    assert_refused(tmp_path, capsys, ["bench", str(model_dir), *extra], fragment)


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_folder_without_report(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path, capsys, ["inspect", str(tmp_path / "empty")], "holds no report.md")


def test_inspect_needs_a_model(tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["inspect"], "recede inspect needs --from DIR")


# --- train and run: config and data -----------------------------------------------------------

# 16 px: VGG-11's four pools take 8 px to nothing, which is refused as a bad data.image_size now
SMALL = ["--set", "data.image_size=16", "--set", "model.width=0.125", "--set", "train.epochs=1",
         "--set", "export.allow_slower=true", "--set", "export.int8.enabled=false"]  # fmt: skip


@pytest.mark.parametrize("command", ["train", "run"])
def test_out_is_a_file_for_train_and_run(command, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    argv = [command, "-c", "configs/demo.yaml", *SMALL, "--out", str(tmp_path / "taken")]
    assert_refused(tmp_path, capsys, argv, "--out")


CONFIG_CASES = {
    "unknown_key": (["--set", "nonsense.key=1"], "valid keys"),
    "atol_negative": (["--set", "export.atol=-1"], "export.atol"),
    "lr_text": (["--set", "train.lr=abc"], "train.lr"),
    "missing_config_file": (["-c", "configs/nope.yaml"], "nope.yaml"),
    "imagefolder_without_root": (["--set", "data.name=imagefolder"], "needs data.root"),
    # Each of these used to train (or load data) first and fail after: checked up front now.
    "opset_beyond_the_exporter": (["--set", "export.opset=1000"], "export.opset must be in [17,"),
    "threads_huge": (["--set", "bench.threads=100000"], "bench.threads must be in [1, 256]"),
    "image_size_huge": (["--set", "data.image_size=100000"], "data.image_size=100000: one example"),
    "width_huge": (["--set", "model.width=1000"], "model.width=1000.0 gives vgg 9.22e+12 param"),
    "factory_raises": (
        ["--set", f"model.name={__name__}:raising_factory"],
        "building it raised RuntimeError: cannot build with 10 classes",
    ),
    "factory_not_callable": (["--set", f"model.name={__name__}:NOT_CALLABLE"], "not a callable"),
    "factory_exits": (["--set", f"model.name={__name__}:exiting_factory"], "called sys.exit(0)"),
    "module_syntax_error": (
        ["--set", "model.name=recede_bad_syntax:build"],
        "model.name: cannot import model factory 'recede_bad_syntax:build'",
    ),
    "module_raises_at_import": (
        ["--set", "model.name=recede_raises_at_import:build"],
        "importing recede_raises_at_import raised KeyError",
    ),
}


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_for_train(case, command, tmp_path, capsys, user_modules):
    extra, fragment = CONFIG_CASES[case]
    argv = [command, "-c", "configs/demo.yaml", *SMALL, *extra, "--out", str(tmp_path / "o")]
    assert_refused(tmp_path, capsys, argv, fragment)


def test_a_config_that_is_a_list_names_its_file(tmp_path, capsys):
    config = tmp_path / "listed.yaml"
    config.write_text("- train:\n    epochs: 1\n")
    argv = ["train", "-c", str(config), *SMALL, "--out", str(tmp_path / "o")]
    assert_refused(tmp_path, capsys, argv, f"config file '{config}' must be a mapping of sections")


def test_cifar_missing_from_an_empty_root(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    sets = ["--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'data'}"]
    argv = ["train", "-c", "configs/demo.yaml", *SMALL, *sets, "--out", str(tmp_path / "o")]
    assert_refused(tmp_path, capsys, argv, "cifar-10-batches-py", absent=("download=True",))


def test_fashion_mnist_missing_from_an_empty_root(tmp_path, capsys, monkeypatch):
    """No Debian files and nothing at data.root: exit 2 naming both, no download tried and
    nothing created inside data.root (torchvision made FashionMNIST/raw there, then fetched)."""
    import torchvision.datasets.mnist

    import pipeline.data.datasets

    tried = []
    monkeypatch.setattr(pipeline.data.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    monkeypatch.setattr(
        torchvision.datasets.mnist, "download_and_extract_archive", lambda *a, **k: tried.append(a)
    )
    (tmp_path / "data").mkdir()
    sets = ["--set", "data.name=fashion_mnist", "--set", f"data.root={tmp_path / 'data'}"]
    argv = ["train", "-c", "configs/demo.yaml", *SMALL, *sets, "--out", str(tmp_path / "o")]
    err = assert_refused(tmp_path, capsys, argv, "apt-get install dataset-fashion-mnist")
    assert "data.root" in err and "FashionMNIST/raw" in err, err
    assert tried == [] and list((tmp_path / "data").iterdir()) == []


def test_ctrl_c_while_staging_prints_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import pipeline.models.checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.models.checkpoint, "save_pruned", interrupted)
    err = assert_refused(
        tmp_path,
        capsys,
        ["prune", *TINY, "--out", str(tmp_path / "o")],
        "recede prune: interrupted; nothing was written",
        code=130,
    )
    assert err.count("\n") == 1, err


def test_no_command(tmp_path, capsys):
    assert_refused(tmp_path, capsys, [], "the following arguments are required")


def test_console_entry_point_exit_code(tmp_path):
    """The real entry point: exit status 2 and a one-line message, no traceback."""
    (tmp_path / "taken").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "prune", *TINY, "--out", str(tmp_path / "taken")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--out" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "taken").read_text() == "mine"
