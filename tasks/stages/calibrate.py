"""calibrate: activation statistics and per-layer quantization sensitivity.

Returns two tables (stored in S3 as Parquet by the flow and reused by every later stage of the
run):
- activations: for the input and output of every Linear layer, min/max, the 0.01/99.99
  percentiles, a histogram, and the MSE- and entropy (KL)-optimal int8 clipping ranges;
- sensitivity: for every embedding table and Linear layer and every candidate dtype, the change
  of the main metric (AUC, Recall@50, NDCG@10) when only that one layer is quantized (on the
  calibration rows), and the measured bytes of the layer in that form.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from tasks.data import Arrays
from tasks.evaluate import predict
from tasks.modules import set_submodule, with_pooled_tables
from tasks.protocol import problem_kind
from tasks.quality import main_metric, scalar_quality
from tasks.quant.observers import entropy_range, histogram, mse_range, percentile_range
from tasks.quant.schemes import EMBEDDING, LINEAR, BuildArgs, Scheme
from tasks.stages.context import StageContext
from tasks.types import CalibrateConfig


@dataclass(frozen=True)
class Calibration:
    activations: pa.Table
    sensitivity: pa.Table


def _subset(data: Arrays, rows: int) -> Arrays:
    return data.take(slice(0, min(rows, len(data))))


@torch.inference_mode()
def activation_table(model: nn.Module, data: Arrays, bins: int) -> pa.Table:
    captured: dict[tuple[str, str], list[np.ndarray]] = {}
    hooks = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor, path: str = path) -> None:
                captured.setdefault((path, "input"), []).append(inputs[0].flatten().numpy())
                captured.setdefault((path, "output"), []).append(output.flatten().numpy())
            hooks.append(module.register_forward_hook(hook))
    try:
        predict(model, data)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for (path, tensor), chunks in captured.items():
        values = np.concatenate(chunks).astype(np.float64)
        counts, edges = histogram(values, bins)
        p_lo, p_hi = percentile_range(values)
        mse_lo, mse_hi = mse_range(counts, edges, 8)
        kl_lo, kl_hi = entropy_range(counts, edges, 8)
        rows.append({"module": path, "tensor": tensor, "count": len(values),
                     "min": float(values.min()), "max": float(values.max()),
                     "p_lo": p_lo, "p_hi": p_hi, "mse_lo": mse_lo, "mse_hi": mse_hi,
                     "kl_lo": kl_lo, "kl_hi": kl_hi, "hist_counts": counts.tolist(),
                     "hist_edges": edges.tolist()})
    return pa.Table.from_pylist(rows)


def _nbytes(module: nn.Module) -> int:
    """Bytes of the module's tensors as stored (safetensors, without the header)."""
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    return sum(t.numel() * t.element_size() for t in state.values()) if state else 0


def sensitivity_table(model: nn.Module, data: Arrays) -> pa.Table:
    task = problem_kind(model)

    def score() -> float:
        return scalar_quality(task, data, predict(model, data))

    metric = main_metric(task)
    base = score()
    rows = []
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding):
            schemes: Mapping[str, Scheme[Any]] = EMBEDDING
        elif isinstance(module, nn.Linear):
            schemes = LINEAR
        else:
            continue
        # every scheme mixed precision may choose, built as quantize builds it by default
        for choice, scheme in schemes.items():
            if not scheme.measured:
                continue
            replacement = scheme.build(module, scheme, BuildArgs(path))
            set_submodule(model, path, replacement)
            try:
                value = base if replacement is module else score()
            finally:
                set_submodule(model, path, module)
            rows.append({"module": path, "choice": choice, "bytes": _nbytes(replacement),
                         "metric": metric, "value": value, "loss": base - value,
                         "relative_loss": (base - value) / base if base else float("inf")})
    return pa.Table.from_pylist(rows)


def calibrate(model: nn.Module, cfg: CalibrateConfig, ctx: StageContext) -> Calibration:
    """Measure activation ranges and per-layer sensitivity on the calibration rows."""
    data = ctx.need("calibration")
    assert isinstance(data, Arrays)
    model = with_pooled_tables(model.cpu().eval())  # a bag's table is a table (modules.bag)
    acts = activation_table(model, _subset(data, cfg.rows), cfg.bins)
    sens = sensitivity_table(model, _subset(data, cfg.sensitivity_rows))
    ctx.log(f"calibrate: {acts.num_rows} activations, {sens.num_rows} sensitivity rows")
    return Calibration(acts, sens)


def table_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


__all__ = ["Calibration", "calibrate", "table_bytes"]
