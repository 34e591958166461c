import numpy as np
import pytest
import torch

from tasks.quant.mixed import Option, assign
from tasks.quant.observers import entropy_range, histogram, mse_range, percentile_range
from tasks.quant.primitives import (
    affine_codes,
    affine_dequant,
    mse_row_ranges,
    pack,
    symmetric_codes,
    symmetric_dequant,
    unpack,
)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_affine_error_within_half_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(300, 32) * torch.rand(300, 1) * 5
    lo, hi = w.min(1).values, w.max(1).values
    codes, scale, offset = affine_codes(w, lo, hi, bits)
    err = (affine_dequant(codes, scale, offset) - w).abs() / scale[:, None]
    assert err.max() <= 0.5 + 1e-4


@pytest.mark.parametrize("bits", [4, 2])
def test_packing_round_trips_exactly_and_matches_fbgemm_layout(bits):
    codes = torch.randint(0, 2**bits, (50, 16), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (50, 16 * bits // 8)
    assert torch.equal(unpack(packed, bits, 16), codes)
    w = torch.randn(7, 16)
    prepack = {4: torch.ops.quantized.embedding_bag_4bit_prepack,
               2: torch.ops.quantized.embedding_bag_2bit_prepack}[bits](w)
    code_bytes = prepack[:, : 16 * bits // 8]
    assert torch.equal(pack(unpack(code_bytes, bits, 16), bits), code_bytes)


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_groupwise_error_bound(bits):
    w = torch.randn(16, 64)
    codes, scale = symmetric_codes(w, bits, 16)
    assert scale.shape == (16, 4)
    err = (symmetric_dequant(codes, scale) - w).abs()
    assert (err <= scale.repeat_interleave(16, dim=1) / 2 + 1e-6).all()


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="group_size 24 does not divide the layer width 64"):
        symmetric_codes(torch.randn(4, 64), 4, 24)


def test_observers_recover_known_ranges():
    rng = np.random.default_rng(0)
    uniform = rng.uniform(-3, 3, 200_000)
    counts, edges = histogram(uniform)
    assert mse_range(counts, edges, 8) == pytest.approx((-3, 3), abs=0.05)
    gauss = rng.normal(0, 1, 400_000)
    with_outliers = np.concatenate([gauss, [40.0, -35.0]])
    assert percentile_range(with_outliers)[1] == pytest.approx(3.72, abs=0.2)  # ignores them
    counts, edges = histogram(gauss)
    lo4, hi4 = mse_range(counts, edges, 4)
    assert 2.2 < hi4 < 2.9 and -2.9 < lo4 < -2.2  # ~2.55 sigma: the known MSE-optimal 4-bit clip
    lo8, hi8 = mse_range(counts, edges, 8)
    assert 3.2 < hi8 <= edges[-1] and hi8 > hi4  # more bits, wider optimal clip
    _, t = entropy_range(*histogram(np.abs(rng.laplace(0, 1, 400_000)) * np.sign(
        rng.normal(size=400_000)), 2048), 8)
    assert 3 < t < 15  # clips the long Laplace tail (max is ~13)


def test_mse_row_ranges_beat_minmax_at_4_bits():
    torch.manual_seed(0)
    w = torch.randn(200, 64)
    w[:, 0] = 8.0  # one outlier column
    def err(lo, hi):
        c, s, o = affine_codes(w, lo, hi, 4)
        return (affine_dequant(c, s, o) - w).pow(2).mean()
    assert err(*mse_row_ranges(w, 4)) < 0.95 * err(w.min(1).values, w.max(1).values)


def test_mixed_assignment_is_the_cheapest_within_budget():
    opts = {
        "a": [Option("fp32", 100, 0.0), Option("int8", 25, 0.1), Option("int4", 13, 0.5)],
        "b": [Option("fp32", 100, 0.0), Option("int8", 25, 0.2), Option("int4", 13, 0.3)],
    }
    assert assign(opts, 0.0) == {"a": "fp32", "b": "fp32"}
    assert assign(opts, 0.3) == {"a": "int8", "b": "int8"}
    assert assign(opts, 0.45) == {"a": "int8", "b": "int4"}
    assert assign(opts, 1.0) == {"a": "int4", "b": "int4"}
    # brute force agrees on a random instance
    import itertools
    rng = np.random.default_rng(1)
    opts = {f"l{i}": [Option("fp32", 100, 0.0)] + [
        Option(f"q{k}", int(rng.integers(5, 90)), float(rng.random())) for k in range(3)]
        for i in range(5)}
    budget = 1.2
    best = min((sum(o.bytes for o in combo), combo) for combo in itertools.product(*opts.values())
               if sum(o.loss for o in combo) <= budget)[0]
    plan = assign(opts, budget)
    got = sum(next(o.bytes for o in opts[k] if o.choice == v) for k, v in plan.items())
    assert sum(next(o.loss for o in opts[k] if o.choice == v) for k, v in plan.items()) <= budget
    assert got == best
