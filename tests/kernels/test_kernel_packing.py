"""Packing helpers: layout, grad accumulation, copy-back and the per-block layer table."""

import pytest
import torch

from kernels import packing


def test_pack_then_add_flat_grad_round_trips(make_layers):
    layers = make_layers((3, 1, 5))
    layers[2].grad = torch.ones_like(layers[2])
    flat = packing.pack(layers)
    assert flat.shape == (9,) and packing.sizes_of(layers) == (3, 1, 5)
    torch.testing.assert_close(flat[3:4], layers[1].detach())
    packing.add_flat_grad_(layers, torch.arange(9.0, device=flat.device))
    torch.testing.assert_close(layers[0].grad, torch.arange(3.0, device=flat.device))
    torch.testing.assert_close(layers[2].grad, 1.0 + torch.arange(4.0, 9.0, device=flat.device))


def test_mixed_dtypes_pack_to_fp32_and_come_back_in_their_dtype(device):
    layers = [
        torch.nn.Parameter(torch.ones(2, device=device, dtype=torch.float16)),
        torch.nn.Parameter(torch.ones(3, device=device)),
    ]
    flat = packing.pack(layers)
    assert flat.dtype == torch.float32
    packing.add_flat_grad_(layers, torch.full((5,), 0.5, device=device))
    assert layers[0].grad.dtype == torch.float16
    packing.copy_flat_(layers, flat * 3)
    assert layers[0].dtype == torch.float16 and float(layers[0][0].detach()) == 3.0


def test_copy_flat_keeps_parameter_storage(make_layers):
    layers = make_layers((4, 2))
    ptrs = [p.data_ptr() for p in layers]
    packing.copy_flat_(layers, torch.zeros(6, device=layers[0].device))
    assert [p.data_ptr() for p in layers] == ptrs
    assert all((p == 0).all() for p in layers)


def test_block_table_never_straddles_layers():
    table = packing.block_table((5, 0, 9), 4, torch.device("cpu")).tolist()
    assert table == [[0, 0, 5], [0, 4, 5], [2, 5, 14], [2, 9, 14], [2, 13, 14]]


def test_check_params_rejects_several_devices():
    with pytest.raises(ValueError, match="one device.*meta"):
        packing.check_params([torch.zeros(2), torch.zeros(2, device="meta")], "op")


def test_check_params_is_none_when_nothing_to_do():
    assert packing.check_params([], "op") is None
    assert packing.check_params([torch.zeros(0)], "op") is None
