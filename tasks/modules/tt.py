"""Tensor-train embedding tables (TT-Rec, Yin et al., MLSys 2021).

A rows x dim table is viewed as a K-way tensor with row index i = (i_1, ..., i_K) and column
j = (j_1, ..., j_K) in mixed radix (rows <= n_1 ... n_K, dim = d_1 ... d_K), and stored as K cores
G_k of shape [n_k, r_{k-1}, d_k, r_k] (r_0 = r_K = 1; the row digit first, so a lookup gathers
contiguous slices):

    E[i, j] = G_1[i_1, :, j_1, :] @ G_2[i_2, :, j_2, :] @ ... @ G_K[i_K, :, j_K, :]

so a row costs sum_k r_{k-1} n_k d_k r_k numbers instead of rows * dim.

Inference (no autograd) contracts the first two cores for every (i_1, i_2) pair once and keeps
that product in memory while the cores stay unchanged (`pair_cache`, never stored): a lookup
then gathers d_1 d_2 r_2 numbers instead of r_1 d_2 r_2 per core-2 slice and runs one small
matmul. Rows once reconstructed are kept in a row cache of at most a quarter of the table
(memory only): a batch whose ids are all cached is one gather, like a dense table's. It is built
only when it holds at most a quarter of the dense table's numbers. `from_table` finds the cores
of a trained table by TT-SVD (sequential truncated SVDs of the unfoldings); at full TT-ranks it
reproduces the table exactly."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _factor(n: int, k: int) -> list[int]:
    """k integers near n**(1/k), non-increasing, whose product is >= n (padding is small)."""
    out, rest = [], n
    for left in range(k, 0, -1):
        f = math.ceil(rest ** (1 / left) - 1e-9)
        out.append(f)
        rest = math.ceil(rest / f)
    return out


def _dim_factors(dim: int, k: int) -> list[int]:
    """k factors whose product is exactly `dim`, as even as the prime factors allow."""
    primes, d, p = [], dim, 2
    while d > 1:
        while d % p == 0:
            primes.append(p)
            d //= p
        p += 1
    out = [1] * k
    for prime in sorted(primes, reverse=True):
        out[out.index(min(out))] *= prime
    return sorted(out, reverse=True)


def _version(t: torch.Tensor) -> int:
    """A tensor's version counter (inference tensors have none: they never change in place)."""
    return -1 if t.is_inference() else t._version


def tt_shape(rows: int, dim: int, k: int = 3) -> tuple[list[int], list[int]]:
    return _factor(rows, k), _dim_factors(dim, k)


def full_ranks(row_factors: list[int], dim_factors: list[int]) -> list[int]:
    """The TT-ranks at which the decomposition is exact (bounded by the unfolding sizes)."""
    sizes = [n * d for n, d in zip(row_factors, dim_factors)]
    return [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]


class TTEmbedding(nn.Module):
    """An embedding table (and embedding bag) stored as tensor-train cores."""

    kind = "tt_embedding"

    def __init__(self, rows: int, dim: int, row_factors: list[int], dim_factors: list[int],
                 ranks: list[int]) -> None:
        super().__init__()
        if math.prod(row_factors) < rows or math.prod(dim_factors) != dim:
            raise ValueError(f"TT shape {row_factors} x {dim_factors} does not cover a "
                             f"{rows} x {dim} table")
        if len(ranks) != len(row_factors) - 1 or min(ranks, default=1) < 1:
            raise ValueError(f"factorize.rank: TT-ranks {ranks} must be {len(row_factors) - 1} "
                             "values >= 1")
        self.rows, self.dim = rows, dim
        self.row_factors, self.dim_factors, self.ranks = list(row_factors), list(dim_factors), \
            list(ranks)
        r = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(n, r[k], d, r[k + 1]))
            for k, (n, d) in enumerate(zip(row_factors, dim_factors)))
        strides = [math.prod(row_factors[k + 1:]) for k in range(len(row_factors))]
        self.register_buffer("strides", torch.tensor(strides), persistent=False)
        self.register_buffer("radix", torch.tensor(row_factors), persistent=False)
        self._pairs: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._rows: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None
        self._cached = 0

    @classmethod
    def from_table(cls, table: nn.Embedding, rank: int | None = None, energy: float = 1.0,
                   k: int = 3) -> TTEmbedding:
        """TT-SVD of `table`: every TT-rank capped at `rank` (None: no cap) and at the smallest
        rank holding `energy` of the unfolding's squared singular values."""
        weight = table.weight.detach().double()
        rows, dim = weight.shape
        ns, ds = tt_shape(rows, dim, k)
        padded = torch.zeros(math.prod(ns), dim, dtype=torch.float64)
        padded[:rows] = weight
        # [n_1..n_K, d_1..d_K] -> [n_1, d_1, n_2, d_2, ...]: unfoldings split (n_k d_k) pairs
        t = padded.reshape(*ns, *ds).permute(*[a for p in zip(range(k), range(k, 2 * k))
                                                for a in p])
        cores, ranks, carry, r_prev = [], [], t.reshape(-1), 1
        for i in range(k - 1):
            mat = carry.reshape(r_prev * ns[i] * ds[i], -1)
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-300)
            r = int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=s.dtype))) + 1
            r = max(1, min(r, rank or r, s.numel()))
            cores.append(u[:, :r].reshape(r_prev, ns[i], ds[i], r))
            carry = s[:r, None] * vh[:r]
            ranks.append(r)
            r_prev = r
        cores.append(carry.reshape(r_prev, ns[-1], ds[-1], 1))
        module = cls(rows, dim, ns, ds, ranks)
        with torch.no_grad():
            for param, core in zip(module.cores, cores):
                param.copy_(core.permute(1, 0, 2, 3).float())  # [r, n, d, r] -> [n, r, d, r]
        return module

    def pair_cache_numbers(self) -> int:
        n, d = self.row_factors, self.dim_factors
        return n[0] * n[1] * d[0] * d[1] * self.ranks[1] if len(n) > 2 else self.rows * self.dim

    def _pair_cache(self) -> torch.Tensor | None:
        if torch.is_grad_enabled() or 4 * self.pair_cache_numbers() > self.rows * self.dim:
            return None
        key = (_version(self.cores[0]), _version(self.cores[1]), self.cores[0].data_ptr(),
               self.cores[1].data_ptr())
        if self._pairs is None or self._pairs[0] != key:
            g1, g2 = self.cores[0][:, 0], self.cores[1]  # [n1, d1, r1], [n2, r1, d2, r2]
            pairs = torch.einsum("apr,brds->abpds", g1, g2)
            n, d = self.row_factors, self.dim_factors
            self._pairs = (key, pairs.reshape(n[0] * n[1], d[0] * d[1], g2.shape[-1]))
        return self._pairs[1]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (1-D). At inference, rows already reconstructed come from the row cache
        (a plain gather); the others are computed from the cores and kept while the cache has
        room (`CACHE_SHARE` of the rows: under a skewed id distribution, the head)."""
        if torch.is_grad_enabled():
            return self._compute(ids)
        slot, rows = self._row_cache()
        slots = slot[ids]
        if bool((slots >= 0).all()):
            return rows[slots]
        out = self._compute(ids)
        missing = torch.unique(ids[slots < 0])
        free = min(rows.shape[0] - self._cached, len(missing))
        if free:
            new = torch.arange(self._cached, self._cached + free, device=ids.device)
            first = torch.zeros(self.rows, dtype=torch.long, device=ids.device)
            first[ids] = torch.arange(len(ids), device=ids.device)  # a position of each id
            rows[new] = out[first[missing[:free]]]
            slot[missing[:free]] = new.to(slot.dtype)
            self._cached += free
        return out

    CACHE_SHARE = 0.25
    """The row cache holds at most this share of the table's rows (memory only, never stored)."""

    def _row_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple((_version(c), c.data_ptr(), str(c.device)) for c in self.cores)
        if getattr(self, "_rows", None) is None or self._rows[0] != key:
            device = self.cores[0].device
            cap = max(1, int(self.rows * self.CACHE_SHARE))
            with torch.inference_mode(False):  # normal tensors: filled in any later mode
                self._rows = (key, torch.full((self.rows,), -1, dtype=torch.int32,
                                              device=device),
                              torch.zeros(cap, self.dim, device=device))
            self._cached = 0
        return self._rows[1], self._rows[2]

    def _compute(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` from the cores, each distinct id computed once (ids repeat a lot)."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        digits = (unique[:, None] // self.strides) % self.radix  # [U, K]
        pairs, start = self._pair_cache(), 1
        if pairs is not None:
            out = pairs[digits[:, 0] * self.row_factors[1] + digits[:, 1]]  # [U, d1 d2, r_2]
            start = 2
        else:
            out = self.cores[0][digits[:, 0], 0]  # [U, d_1, r_1]
        for k in range(start, len(self.cores)):
            core = self.cores[k][digits[:, k]]  # [U, r_{k-1}, d_k, r_k]
            r_in, r_out = core.shape[1], core.shape[3]
            out = torch.bmm(out, core.reshape(len(unique), r_in, -1)).reshape(
                len(unique), -1, r_out)  # [U, d_1..d_k, r_k]
        return out.reshape(len(unique), self.dim)[inverse]

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Like nn.Embedding(ids) without `offsets`; like nn.EmbeddingBag(mode="sum") with
        `offsets` (1-D ids, bag b = ids[offsets[b]:offsets[b+1]])."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise IndexError(f"TT embedding: ids must be in [0, {self.rows}) (got "
                             f"{int(ids.min())}..{int(ids.max())})")
        if offsets is None:
            return self.lookup(ids.reshape(-1)).reshape(*ids.shape, self.dim)
        rows = self.lookup(ids)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[:, None]
        bag = torch.bucketize(torch.arange(len(ids), device=ids.device), offsets, right=True) - 1
        return rows.new_zeros(len(offsets), self.dim).index_add(0, bag, rows)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "dim": self.dim,
                "row_factors": self.row_factors, "dim_factors": self.dim_factors,
                "ranks": self.ranks}


class QuantTTEmbedding(nn.Module):
    """A TT table whose cores are stored as int8 or int4 codes with one scale per core slice
    (core k's slice [i_k, r, :, :]: symmetric, per row digit and input rank). The cores are
    dequantized once per process into a plain `TTEmbedding` (memory only, never stored), so
    lookups cost what the float TT's do and the stored bytes are 1/4 or 1/8 of its cores'.
    """

    kind = "quant_tt_embedding"

    def __init__(self, rows: int, dim: int, row_factors: list[int], dim_factors: list[int],
                 ranks: list[int], bits: int) -> None:
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"TT core bits must be 8 or 4 (got {bits})")
        self.rows, self.dim, self.bits = rows, dim, bits
        self.row_factors, self.dim_factors, self.ranks = list(row_factors), list(dim_factors), \
            list(ranks)
        r = [1, *ranks, 1]
        for k, (n, d) in enumerate(zip(row_factors, dim_factors)):
            width = d * r[k + 1]
            self.register_buffer(f"codes{k}", torch.zeros(
                n * r[k], width if bits == 8 else (width + 1) // 2,
                dtype=torch.int8 if bits == 8 else torch.uint8))
            self.register_buffer(f"scale{k}", torch.ones(n * r[k], 1))
        self._float: tuple[tuple[object, ...], TTEmbedding] | None = None

    @classmethod
    def from_tt(cls, tt: TTEmbedding, bits: int) -> QuantTTEmbedding:
        from tasks.quant.primitives import pack, symmetric_codes

        module = cls(tt.rows, tt.dim, tt.row_factors, tt.dim_factors, tt.ranks, bits)
        for k, core in enumerate(tt.cores):
            flat = core.detach().float().reshape(core.shape[0] * core.shape[1], -1)
            codes, scale = symmetric_codes(flat, bits, None)
            if bits == 4:
                unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
                if flat.shape[1] % 2:
                    unsigned = torch.cat([unsigned, torch.full_like(unsigned[:, :1], 8)], dim=1)
                codes = pack(unsigned, 4)
            getattr(module, f"codes{k}").copy_(codes)
            getattr(module, f"scale{k}").copy_(scale)
        return module

    def float_tt(self) -> TTEmbedding:
        """The dequantized cores as a float TT (rebuilt only when the codes change)."""
        from tasks.quant.primitives import symmetric_dequant, unpack

        key = (*(_version(getattr(self, f"codes{k}")) for k in range(len(self.row_factors))),
               str(self.codes0.device))
        if self._float is None or self._float[0] != key:
            tt = TTEmbedding(self.rows, self.dim, self.row_factors, self.dim_factors, self.ranks)
            with torch.no_grad():
                for k, param in enumerate(tt.cores):
                    codes = getattr(self, f"codes{k}")
                    width = param.shape[2] * param.shape[3]
                    if self.bits == 4:
                        codes = unpack(codes, 4, width).to(torch.int8) - 8
                    param.copy_(symmetric_dequant(codes, getattr(self, f"scale{k}"))
                                .reshape(param.shape))
            tt.requires_grad_(False)
            self._float = (key, tt.to(self.codes0.device))
        return self._float[1]

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.float_tt()(ids, offsets, per_sample_weights)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "dim": self.dim,
                "row_factors": self.row_factors, "dim_factors": self.dim_factors,
                "ranks": self.ranks, "bits": self.bits}
