"""The int8 proxy's simulation of int8 rounding (benchmarks/int8_proxy.py `sensitivity`) against
plain computations: what it rounds, where, and the FLOPs it counts."""
import torch
import torch.nn.functional as F

from benchmarks.int8_proxy import _fake_u8, _Gemms, _rtn_int8


def test_rtn_int8_rounds_each_output_channel_to_its_own_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 5, 3, 3) * torch.linspace(0.1, 4, 8).view(8, 1, 1, 1)
    q = _rtn_int8(w)
    scale = w.abs().flatten(1).amax(1) / 127  # (8,)
    steps = q / scale.view(8, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # on the grid
    assert steps.abs().max() <= 127 + 1e-4
    assert ((q - w).abs() <= scale.view(8, 1, 1, 1) / 2 + 1e-6).all()  # nearest
    assert not torch.equal(q, w)


def test_fake_u8_rounds_to_256_levels_of_the_range_and_clips_outside():
    torch.manual_seed(0)
    x = torch.randn(4000) * 3 + 1
    lo, hi = -2.0, 5.0
    y = _fake_u8(x, lo, hi)
    step = (hi - lo) / 255
    inside = (x >= lo) & (x <= hi)
    assert ((y - x)[inside].abs() <= step / 2 + 1e-5).all()
    assert torch.allclose(y[~inside], x[~inside].clamp(lo, hi), atol=step)  # clipped to the range
    assert len(torch.unique(y)) <= 256
    assert _fake_u8(torch.zeros(3), lo, hi).abs().max() < 1e-6  # zero exactly representable


def test_gemms_counts_flops_and_ranges_and_rounds_only_the_chosen_inputs():
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(16, 24), torch.nn.Conv2d(3, 6, 3, padding=1)
    x, img = torch.randn(2, 10, 16), torch.randn(2, 3, 8, 8)
    gemms = _Gemms({"lin": lin.weight, "conv": conv.weight})
    with torch.no_grad(), gemms:
        y, z = lin(x), conv(img)
        F.linear(x, torch.randn(4, 16))  # a weight it was not given
    assert gemms.flops == {"lin": 2.0 * 16 * 2 * 10 * 24, "conv": 2.0 * 3 * 9 * 2 * 6 * 8 * 8}
    assert gemms.unmapped == 2.0 * 16 * 2 * 10 * 4
    assert gemms.ranges["lin"] == [(float(x.min()), float(x.max()))]
    gemms.quantized = {"lin": (-1.0, 1.0)}
    with torch.no_grad(), gemms:
        y8, z8 = lin(x), conv(img)
    assert torch.allclose(y8, lin(_fake_u8(x, -1.0, 1.0)), atol=1e-5)
    assert not torch.allclose(y8, y, atol=1e-3)
    assert torch.equal(z8, z)
