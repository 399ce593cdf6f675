"""torch.compile over recede's ops on the CPU: a bounded-BN model's training forward and
backward match eager (torch reference and interpreted Triton custom ops, the latter with
``fullgraph=True``: no graph break at the ops), the penalty op compiles, and
``train.compile`` wraps without copying. Inductor, slow on 2 cores, runs in one slow test."""

import copy

import pytest
import torch
from torch import nn

from kernels.receding_penalty import receding_penalty_
from pipeline.config import TrainConfig
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.train.fuse_relu import fuse_bn_relu_
from pipeline.train.loop import maybe_compile

FP32 = {"rtol": 1e-4, "atol": 1e-4}  # the kernel tests' fp32 tolerance


def _model(backend: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BoundedBatchNorm2d(8, shift=True, backend=backend),
        nn.ReLU(),
        nn.Conv2d(8, 7, 3, padding=1, bias=False),
        BoundedBatchNorm2d(7, backend=backend),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(7, 3),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.normal_()
    return model.train()


def _compiled_matches_eager(
    backend: str, compiler: str, *, fuse: bool, fullgraph: bool, device: str = "cpu"
):
    eager = _model(backend).to(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    if fuse:
        fuse_bn_relu_(eager, x)
    plain = copy.deepcopy(eager)
    compiled = torch.compile(eager, backend=compiler, fullgraph=fullgraph)
    for step in range(2):  # twice: the second call runs the cached graph
        xs = x + step
        want, got = plain(xs), compiled(xs)
        want.square().sum().backward()
        got.square().sum().backward()
        torch.testing.assert_close(got, want, **FP32)
    for (name, p), q in zip(plain.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **FP32, msg=name)
    for (name, b), c in zip(plain.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(c, b, **FP32, msg=name)


@pytest.mark.parametrize("fuse", [False, True], ids=["bn_relu", "fused"])
def test_compiled_reference_model_matches_eager(fuse):
    _compiled_matches_eager("torch", "aot_eager", fuse=fuse, fullgraph=False)


@pytest.mark.parametrize("fuse", [False, True], ids=["bn_relu", "fused"])
def test_compiled_triton_ops_are_single_nodes(fuse, device, triton_backend):
    _compiled_matches_eager(triton_backend, "aot_eager", fuse=fuse, fullgraph=True, device=device)


def _recorder(graphs: list[str]):
    """A torch.compile backend that keeps the captured graph's code and runs it as is."""

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    return record


def test_compiled_graph_holds_the_custom_ops(device, triton_backend):
    graphs = []
    model = _model(triton_backend).to(device)
    compiled = torch.compile(model, backend=_recorder(graphs), fullgraph=True)
    compiled(torch.randn(4, 3, 8, 8, device=device))
    assert len(graphs) == 1 and graphs[0].count("torch.ops.recede.bounded_bn_forward") == 2


def test_compiled_penalty_step_matches_eager():
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=gen) * 3) for n in (1, 7, 4099)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for p in params + twins:
        p.grad = torch.ones_like(p)

    def step(ps):
        return receding_penalty_(ps, strength=0.1, backend="torch")

    want = step(params)
    graphs = []
    got = torch.compile(step, backend=_recorder(graphs), fullgraph=True)(twins)
    assert "torch.ops.recede.receding_penalty_" in graphs[0]
    torch.testing.assert_close(got, want)
    for p, q in zip(twins, params, strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_maybe_compile_wraps_only_when_asked():
    model = _model("torch")
    assert maybe_compile(model, TrainConfig()) is model
    wrapped = maybe_compile(model, TrainConfig(compile=True), backend="aot_eager")
    assert wrapped is not model and wrapped._orig_mod is model
    assert all(a is b for a, b in zip(wrapped.parameters(), model.parameters(), strict=True))


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    _compiled_matches_eager("torch", "inductor", fuse=True, fullgraph=False)


@pytest.mark.gpu
def test_cuda_graph_captures_the_triton_training_pass():
    from kernels.dispatch import interpreting

    if not torch.cuda.is_available() or interpreting():
        pytest.skip("needs a CUDA device and compiled kernels (make test-gpu)")
    model = _model("triton").cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: kernels compiled, caches filled
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.cuda.graph(graph):
        out = model(x)
        out.square().sum().backward()
    for p in model.parameters():
        p.grad.zero_()
    graph.replay()
    want = reference(x)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, **FP32)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **FP32, msg=name)


@pytest.mark.slow
def test_train_with_compile_matches_eager_training():
    """``train.compile: true`` end to end: one epoch of ``train_`` (penalty and budget
    controller included) gives the eager run's losses and weights within tolerance."""
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.datasets import DataBundle
    from pipeline.train.loop import train_
    from pipeline.train.polarise import Polariser

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 3, (32,)))
    bundle = DataBundle(DataLoader(data, batch_size=8), DataLoader(data, batch_size=16), 3, 3, 8)
    runs = []
    for compile_ in (False, True):
        cfg = TrainConfig(device="cpu", compile=compile_, target=0.3, lr=0.01)
        model = _model("torch")
        pol = Polariser.prepare(model, torch.randn(1, 3, 8, 8), cfg, total_steps=4, convert=False)
        logs = train_(model, bundle, cfg, epochs=1, lr=0.01, polariser=pol)
        runs.append((logs[0], model.state_dict()))
    (eager_log, eager_state), (compiled_log, compiled_state) = runs
    assert compiled_log.loss == pytest.approx(eager_log.loss, rel=1e-4)
    assert compiled_log.penalty == pytest.approx(eager_log.penalty, rel=1e-4)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, **FP32, msg=name)
