"""Tensor-train embedding tables: exact at full TT-rank, EmbeddingBag semantics, storage."""

import math

import pytest
import torch
from torch import nn

from tasks.modules import TTEmbedding, apply_manifest, manifest_of
from tasks.modules.tt import full_ranks, tt_shape


@pytest.mark.parametrize(("rows", "dim", "k"), [(1000, 16, 3), (97, 12, 3), (50, 8, 2),
                                                (3, 4, 3), (5000, 64, 4)])
def test_full_tt_rank_reproduces_the_table(rows, dim, k):
    table = nn.Embedding(rows, dim)
    tt = TTEmbedding.from_table(table, rank=None, energy=1.0, k=k)
    assert tt.ranks == full_ranks(tt.row_factors, tt.dim_factors)
    ids = torch.arange(rows)
    torch.testing.assert_close(tt(ids), table(ids), atol=1e-5, rtol=1e-5)
    assert math.prod(tt.row_factors) >= rows and math.prod(tt.dim_factors) == dim


def test_truncated_tt_is_smaller_and_its_error_falls_with_the_rank():
    rows, dim = 4096, 16
    table = nn.Embedding(rows, dim)
    errs = []
    for r in (2, 8, 32):
        tt = TTEmbedding.from_table(table, rank=r)
        assert max(tt.ranks) <= r
        errs.append((tt(torch.arange(rows)) - table.weight).norm().item())
        assert sum(c.numel() for c in tt.cores) < rows * dim
    assert errs[0] >= errs[1] >= errs[2]


def test_bag_forward_matches_embedding_bag_sum():
    table = nn.Embedding(300, 8)
    tt = TTEmbedding.from_table(table, rank=None)
    bag = nn.EmbeddingBag.from_pretrained(table.weight.detach(), mode="sum")
    ids = torch.tensor([3, 3, 299, 0, 17, 42, 42, 42])
    offsets = torch.tensor([0, 2, 3, 3, 6])  # an empty bag at 3
    weights = torch.rand(len(ids))
    torch.testing.assert_close(tt(ids, offsets), bag(ids, offsets), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tt(ids, offsets, weights),
                               bag(ids, offsets, per_sample_weights=weights), atol=1e-5, rtol=1e-5)
    assert tt(ids.reshape(2, 4)).shape == (2, 4, 8)


def test_tt_trains_and_rebuilds_from_its_manifest():
    model = nn.Sequential(TTEmbedding.from_table(nn.Embedding(500, 8), rank=4))
    loss = model(torch.tensor([1, 2, 3])).pow(2).sum()
    loss.backward()
    assert all(c.grad is not None for c in model[0].cores)
    rebuilt = apply_manifest(nn.Sequential(nn.Embedding(500, 8)), manifest_of(model))
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.arange(500)
    assert torch.equal(rebuilt(ids), model(ids))


def test_bad_tt_shapes_are_refused():
    with pytest.raises(ValueError, match="does not cover"):
        TTEmbedding(1000, 16, [5, 5, 5], [2, 2, 4], [2, 2])
    with pytest.raises(ValueError, match="factorize.rank"):
        TTEmbedding(100, 8, [5, 5, 4], [2, 2, 2], [0, 2])
    ns, ds = tt_shape(100_000, 64)
    assert math.prod(ns) >= 100_000 and math.prod(ns) < 1.05 * 100_000 and ds == [4, 4, 4]


def test_inference_pair_cache_matches_and_follows_updates():
    table = nn.Embedding(20_000, 16)
    tt = TTEmbedding.from_table(table, rank=8)
    assert 4 * tt.pair_cache_numbers() <= 20_000 * 16  # small enough to be cached
    ids = torch.randint(0, 20_000, (300,))
    with torch.no_grad():
        cached = tt(ids)
    assert tt._pairs is not None
    torch.testing.assert_close(cached, tt(ids), atol=1e-5, rtol=1e-5)  # autograd path: no cache
    with torch.no_grad():
        tt.cores[1].mul_(2.0)  # an update bumps the version: the cache is rebuilt
        torch.testing.assert_close(tt(ids), 2 * cached, atol=1e-5, rtol=1e-5)


def test_out_of_range_ids_raise_like_nn_embedding():
    tt = TTEmbedding.from_table(nn.Embedding(100, 8), rank=2)
    with pytest.raises(IndexError, match=r"ids must be in \[0, 100\)"):
        tt(torch.tensor([3, 100]))


def test_row_cache_serves_reconstructed_rows_is_bounded_and_follows_updates():
    table = nn.Embedding(4_000, 16)
    tt = TTEmbedding.from_table(table, rank=8)
    hot = torch.randint(0, 200, (512,))
    with torch.inference_mode():
        first = tt(hot)
        assert tt._cached == len(torch.unique(hot))  # the hot rows are kept
        again = tt(hot)  # all cached: one gather
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(again, tt(hot), atol=1e-5, rtol=1e-5)  # autograd path agrees
    with torch.no_grad():  # a different mode fills the same cache
        everything = tt(torch.arange(4_000))
    assert tt._cached == int(4_000 * TTEmbedding.CACHE_SHARE)  # never more than its share
    torch.testing.assert_close(everything[hot], first)
    with torch.no_grad():
        tt.cores[2].mul_(2.0)  # new cores: the cache starts over
        torch.testing.assert_close(tt(hot), 2 * first, atol=1e-5, rtol=1e-5)
