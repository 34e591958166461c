"""Structurally compressed modules (pruned, sparse, low-rank). Plain tensors only; each
rebuilds empty from its manifest. Their inner nn.Embedding / nn.Linear parts stay ordinary
modules, so a later quantize stage compresses them further (prune -> quantize chains)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class PrunedLinear(nn.Linear):
    """A Linear whose shape was reduced by structured pruning (recorded for rebuilding)."""

    kind = "pruned_linear"

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features}


class SparseLinear(nn.Module):
    """Unstructured-sparse Linear stored as CSR: per-row counts, int16/int32 column indices
    and the kept values (trainable: fine-tuning keeps the sparsity pattern)."""

    kind = "sparse_linear"

    def __init__(self, in_features: int, out_features: int, nnz: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        idx_dtype = torch.int16 if in_features < 2**15 else torch.int32
        self.register_buffer("row_counts", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("cols", torch.zeros(nnz, dtype=idx_dtype))
        self.values = nn.Parameter(torch.zeros(nnz))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor) -> SparseLinear:
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order = CSR order
        module = cls(linear.in_features, linear.out_features, int(rows.numel()))
        module.row_counts.copy_(mask.sum(dim=1).to(torch.int32))
        module.cols.copy_(cols.to(module.cols.dtype))
        with torch.no_grad():
            module.values.copy_(linear.weight.detach()[rows, cols])
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def dense_weight(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=self.values.device),
                                       self.row_counts.long())
        flat = rows * self.in_features + self.cols.long()
        w = self.values.new_zeros(self.out_features * self.in_features)
        return w.index_put((flat,), self.values).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features, "nnz": int(self.values.numel())}


class PrunedEmbedding(nn.Module):
    """A table keeping `kept` rows; every other id maps to one shared fallback row."""

    kind = "pruned_embedding"

    def __init__(self, rows: int, kept: int, dim: int) -> None:
        super().__init__()
        self.rows, self.kept, self.dim = rows, kept, dim
        self.register_buffer("remap", torch.full((rows,), kept, dtype=torch.int32))
        self.table = nn.Embedding(kept + 1, dim)  # last row = fallback

    @classmethod
    def from_table(cls, table: nn.Embedding, keep: torch.Tensor) -> PrunedEmbedding:
        """`keep`: ids of the rows to keep. The fallback row is the mean of the dropped rows."""
        rows, dim = table.weight.shape
        module = cls(rows, int(keep.numel()), dim)
        module.remap[keep] = torch.arange(keep.numel(), dtype=torch.int32)
        dropped = torch.ones(rows, dtype=torch.bool)
        dropped[keep] = False
        with torch.no_grad():
            module.table.weight[:-1] = table.weight[keep]
            module.table.weight[-1] = (table.weight[dropped].mean(dim=0) if dropped.any()
                                       else 0.0)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.remap[ids].long())

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "kept": self.kept, "dim": self.dim}


class LowRankLinear(nn.Module):
    """W ~= U V: `first` (in -> rank, no bias) then `second` (rank -> out)."""

    kind = "low_rank_linear"

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        module = cls(linear.in_features, linear.out_features, rank)
        root = s[:rank].sqrt()
        with torch.no_grad():
            module.first.weight.copy_((root[:, None] * vh[:rank]).float())
            module.second.weight.copy_((u[:, :rank] * root[None, :]).float())
            if linear.bias is not None:
                module.second.bias.copy_(linear.bias.detach())
            else:
                module.second.bias.zero_()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank}


class LowRankEmbedding(nn.Module):
    """E ~= A B: a rows x rank table `a` and a rank x dim projection `b`."""

    kind = "low_rank_embedding"

    def __init__(self, rows: int, dim: int, rank: int) -> None:
        super().__init__()
        self.rows, self.dim, self.rank = rows, dim, rank
        self.a = nn.Embedding(rows, rank)
        self.b = nn.Linear(rank, dim, bias=False)

    @classmethod
    def from_table(cls, table: nn.Embedding, rank: int) -> LowRankEmbedding:
        u, s, vh = torch.linalg.svd(table.weight.detach().double(), full_matrices=False)
        rows, dim = table.weight.shape
        module = cls(rows, dim, rank)
        with torch.no_grad():
            module.a.weight.copy_((u[:, :rank] * s[:rank]).float())
            module.b.weight.copy_(vh[:rank].T.float())
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(ids))

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.rows, "dim": self.dim, "rank": self.rank}


def energy_rank(matrix: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values hold `energy` of the squared total."""
    s = torch.linalg.svdvals(matrix.detach().double())
    share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1


class SemiSparseLinear(nn.Module):
    """2:4 semi-structured sparse Linear: in every group of 4 inputs of a row, 2 weights are
    kept. Stored compressed (the kept values + one byte of two 2-bit positions per group:
    9/16 of the fp32 bytes). On a CUDA device at inference it runs NVIDIA's sparse tensor cores
    through `torch.sparse.to_sparse_semi_structured` (fp16); elsewhere it runs dense."""

    kind = "semi_sparse_linear"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4 (got {in_features})")
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(out_features, in_features // 2))
        self.register_buffer("positions", torch.zeros(out_features, in_features // 4,
                                                      dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self._sparse: tuple[tuple[object, ...], torch.Tensor] | None = None  # (key, GPU weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SemiSparseLinear:
        """Keep the 2 largest-magnitude weights of every group of 4."""
        out_f, in_f = linear.weight.shape
        module = cls(in_f, out_f)
        groups = linear.weight.detach().reshape(out_f, in_f // 4, 4)
        keep = groups.abs().topk(2, dim=-1).indices.sort(dim=-1).values  # [out, g, 2]
        with torch.no_grad():
            module.values.copy_(groups.gather(-1, keep).reshape(out_f, in_f // 2))
            module.positions.copy_((keep[..., 0] | (keep[..., 1] << 2)).to(torch.uint8))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def dense_weight(self) -> torch.Tensor:
        pos = self.positions.long()
        keep = torch.stack([pos & 3, pos >> 2], dim=-1)  # [out, g, 2]
        w = self.values.new_zeros(self.out_features, self.in_features // 4, 4)
        w = w.scatter(-1, keep, self.values.reshape(self.out_features, -1, 2))
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not torch.is_grad_enabled():
            from torch.sparse import to_sparse_semi_structured

            key = (self.values._version, self.values.data_ptr(), self.values.device)
            if self._sparse is None or self._sparse[0] != key:
                self._sparse = (key, to_sparse_semi_structured(self.dense_weight().half()))
            return F.linear(x.half(), self._sparse[1], self.bias.half()).to(x.dtype)
        self._sparse = None  # off the GPU: do not hold its memory
        return F.linear(x, self.dense_weight(), self.bias)

    def __deepcopy__(self, memo: dict[int, object]) -> SemiSparseLinear:
        clone = SemiSparseLinear(self.in_features, self.out_features)
        clone.load_state_dict(self.state_dict())
        return clone.to(self.values.device)

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features}


def semi_structured_ok(linear: nn.Linear) -> bool:
    """Shapes NVIDIA's 2:4 fp16 kernels take (CUTLASS: rows % 32, columns % 64)."""
    return linear.out_features % 32 == 0 and linear.in_features % 64 == 0
