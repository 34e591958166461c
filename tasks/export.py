"""Serving exports: a compressed model as a `torch.export` program that plain torch loads.

recsqueeze's compressed modules run torch's fused CPU kernels (fbgemm row-wise embedding bags,
`quantized::linear_dynamic` on a packed weight) and keep memory-only caches (TT rows). Neither
traces: the fused ops have no fake kernels, and a packed weight is an opaque object. So a model
is exported through its *serving form*: a copy in which every compressed module is replaced by
a twin built from core aten ops over the same stored codes (row-wise tables gather their code
bytes and unpack them with shifts; int8 Linear layers quantize the activations as fbgemm does and
multiply integer codes; quantized TT cores are dequantized inside the graph). The program holds
the compressed bytes, not expanded float weights, and loads with `torch.export.load` alone.

`serving_export` checks the program against the eager model on rows of the dataset's shape
before it returns, and names the module that cannot be exported (and why) when one cannot.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tasks.data import column_slots, query_side
from tasks.modules.embedding import RowWiseQuantEmbedding
from tasks.modules.linear import INPUT_QMAX, DynamicInt8Linear, StaticInt8Linear
from tasks.modules.tt import QuantTTEmbedding, TTEmbedding
from tasks.types import CategoricalColumn, DatasetSpec, ModelSpec

PROGRAM = "model.pt2"
AOTI = "model_aoti.pt2"
SERVING = "serving.json"
EXPORT_DIR = "export"  # a registry version's folder of serving files
MAX_BATCH = 65536
CHECK_ROWS = 256


class ExportError(ValueError):
    """A model (or one of its modules) that `torch.export` cannot capture; names which."""


class PackedRows(nn.Module):
    """Serving form of `RowWiseQuantEmbedding`: the same code bytes and fp16/fp32 row
    parameters, gathered per id; sub-byte codes are unpacked through a 256-entry table of each
    byte's codes (one gather, faster than shifting and masking every byte; core aten ops)."""

    def __init__(self, table: RowWiseQuantEmbedding) -> None:
        super().__init__()
        tail = 8 if table.bits == 8 else 4
        ptype = torch.float32 if table.bits == 8 else torch.float16
        packed = table.packed.detach().cpu()
        self.bits, self.dim = table.bits, table.dim
        self.register_buffer("codes", packed[:, :-tail].contiguous())
        self.register_buffer("params", packed[:, -tail:].contiguous().view(ptype))  # scale, offset
        shifts = torch.arange(8 // table.bits, dtype=torch.int32) * table.bits
        byte = torch.arange(256, dtype=torch.int32)[:, None]
        self.register_buffer("unpack", ((byte >> shifts) & ((1 << table.bits) - 1)).float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.codes.index_select(0, flat)
        params = self.params.index_select(0, flat).float()
        if self.bits == 8:
            codes = rows.float()
        else:
            codes = F.embedding(rows.long(), self.unpack).reshape(flat.shape[0], -1)[:, :self.dim]
        out = torch.addcmul(params[:, 1:], codes, params[:, :1])
        return out.reshape(*ids.shape, self.dim)


class Int8Linear(nn.Module):
    """Serving form of `DynamicInt8Linear` / `StaticInt8Linear`: the int8 codes kept; the
    activations quantized as fbgemm does (dynamic: per batch, reduced range 0..127, zero point
    as `ChooseQuantizationParams` picks it; static: the calibrated scale and zero point) and
    multiplied as integers held in fp32 (exact below 2^24 per dot product)."""

    def __init__(self, layer: DynamicInt8Linear) -> None:
        super().__init__()
        self.static = isinstance(layer, StaticInt8Linear)
        self.relu = layer.relu
        self.register_buffer("weight_int8", layer.weight_int8.detach().cpu().clone())
        self.register_buffer("weight_scale", layer.weight_scale.detach().cpu().float().clone())
        self.register_buffer("bias", layer.bias.detach().cpu().float().clone())
        if self.static:
            in_s, in_z, out_s, out_z = layer.act_qparams.tolist()
            self.in_s, self.in_z, self.out_s, self.out_z = in_s, int(in_z), out_s, int(out_z)

    def _dynamic_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = x.min().double().clamp_max(0.0)
        hi = x.max().double().clamp_min(0.0)
        scale = ((hi - lo) / 127.0).float()
        scale = torch.where((scale == 0) | torch.isinf(1.0 / scale),
                            torch.full_like(scale, 0.1), scale).double()
        from_min, from_max = -lo / scale, 127.0 - hi / scale
        err_min, err_max = -(lo / scale).abs(), 127.0 - (hi / scale).abs()
        zero = torch.where(err_min < err_max, from_min, from_max).round().clamp(0, 127).float()
        # fbgemm rounds x * (1 / scale) + zero point (a product, not a quotient: ties differ)
        codes = torch.clamp(torch.round(torch.addcmul(zero, x, 1.0 / scale.float())), 0, 127)
        return codes - zero, scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static:
            x = x.clamp(-self.in_z * self.in_s, (INPUT_QMAX - self.in_z) * self.in_s)
            q = torch.clamp(torch.round(x * (1.0 / self.in_s) + self.in_z), 0, INPUT_QMAX) \
                - self.in_z
            y = F.linear(q, self.weight_int8.float()) * (self.in_s * self.weight_scale) + self.bias
            out = torch.clamp(torch.round(y / self.out_s) + self.out_z, 0, 255)
            return (out - self.out_z) * self.out_s
        q, scale = self._dynamic_codes(x)
        y = torch.addcmul(self.bias, F.linear(q, self.weight_int8.float()), scale * self.weight_scale)
        return F.relu(y) if self.relu else y


class TTRows(nn.Module):
    """Serving form of `TTEmbedding` / `QuantTTEmbedding`: each id's row computed from the
    cores (no row cache: a cache is state, and a program is a function). Quantized cores stay
    codes plus per-slice scales and are dequantized inside the graph."""

    def __init__(self, table: TTEmbedding | QuantTTEmbedding) -> None:
        super().__init__()
        self.rows, self.dim = table.rows, table.dim
        self.row_factors, self.dim_factors = list(table.row_factors), list(table.dim_factors)
        r = [1, *table.ranks, 1]
        self.shapes = [(n, r[k], d, r[k + 1]) for k, (n, d) in
                       enumerate(zip(self.row_factors, self.dim_factors))]
        self.bits = table.bits if isinstance(table, QuantTTEmbedding) else 32
        for k in range(len(self.shapes)):
            if isinstance(table, QuantTTEmbedding):
                self.register_buffer(f"codes{k}", getattr(table, f"codes{k}").detach().cpu().clone())
                self.register_buffer(f"scale{k}", getattr(table, f"scale{k}").detach().cpu().clone())
            else:
                self.register_buffer(f"core{k}", table.cores[k].detach().cpu().clone())
        strides = [math.prod(self.row_factors[k + 1:]) for k in range(len(self.row_factors))]
        self.register_buffer("strides", torch.tensor(strides))
        self.register_buffer("radix", torch.tensor(self.row_factors))
        self.register_buffer("nibbles", torch.tensor([0, 4], dtype=torch.int32))

    def _core(self, k: int) -> torch.Tensor:
        if self.bits == 32:
            return getattr(self, f"core{k}")
        n, r_in, d, r_out = self.shapes[k]
        codes = getattr(self, f"codes{k}")
        if self.bits == 4:
            codes = (((codes.to(torch.int32)[..., None] >> self.nibbles) & 15).reshape(
                codes.shape[0], -1)[:, :d * r_out] - 8)
        return (codes.float() * getattr(self, f"scale{k}")).reshape(n, r_in, d, r_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        digits = (flat[:, None] // self.strides) % self.radix
        out = self._core(0)[digits[:, 0], 0]  # [N, d_1, r_1]
        for k in range(1, len(self.shapes)):
            core = self._core(k)[digits[:, k]]  # [N, r_{k-1}, d_k, r_k]
            r_out = core.shape[3]
            out = torch.bmm(out, core.reshape(core.shape[0], core.shape[1], -1)).reshape(
                core.shape[0], -1, r_out)
        return out.reshape(*ids.shape, self.dim)


SERVING_FORMS: dict[type[nn.Module], Callable[[Any], nn.Module]] = {
    RowWiseQuantEmbedding: PackedRows,
    DynamicInt8Linear: Int8Linear,
    StaticInt8Linear: Int8Linear,
    TTEmbedding: TTRows,
    QuantTTEmbedding: TTRows,
}


def serving_form(model: nn.Module) -> nn.Module:
    """A copy of `model` whose compressed modules are their aten-only serving twins (the
    stored codes are shared, not expanded). The original is left as it is."""
    import copy

    def convert(module: nn.Module) -> nn.Module:
        form = SERVING_FORMS.get(type(module))
        if form is not None:
            return form(module)
        for name, child in list(module.named_children()):
            new = convert(child)
            if new is not child:
                setattr(module, name, new)
        return module

    return convert(copy.deepcopy(model).cpu().eval())


@dataclass
class Inputs:
    """The forward inputs a family's model takes, and what each column is."""

    dense_columns: list[str]
    sparse_columns: list[str]
    sparse_meaning: str
    cardinalities: list[int]
    output: str
    pad: int | None = None
    bags: list[slice] = field(default_factory=list)  # multi-hot slots, PAD-padded


def describe_inputs(spec: ModelSpec, data: DatasetSpec) -> Inputs:
    """What the model's `forward(dense, sparse)` reads, in the dataset spec's column order
    (`tasks.data.to_arrays` builds the same arrays from a split)."""
    kind = spec.problem_kind()
    cards = {c.name: c.cardinality for c in data.categorical}
    bag_meaning = "; a multi-hot column's last ids in its slots, oldest first, left-padded with -1"
    if kind == "ranking":
        cols, ranges, bags = _slots(data.categorical)
        meaning = "one id per categorical column" + (bag_meaning if bags else "")
        return Inputs(list(data.dense), cols, meaning, ranges, "logit of the click probability, "
                      "shape [batch] (sigmoid gives p)", pad=-1 if bags else None, bags=bags)
    if kind == "retrieval":
        query = set(query_side(data))
        cols, ranges, bags = _slots([c for c in data.categorical if c.name in query])
        return Inputs([], cols, "the query/user side's ids" + (bag_meaning if bags else ""),
                      ranges, "a score for every catalogue item, shape [batch, items] (item id "
                      "= column index; higher is better: top-K = topk of each row)",
                      pad=-1 if bags else None, bags=bags)
    width = spec.history_width()
    items = cards[data.item_id] if data.item_id else 1
    return Inputs([], [f"{data.history}[{i}]" for i in range(width)],
                  f"the last {width} items of the user's history (item ids of "
                  f"{data.item_id}, oldest first, left-padded with -1)", [items] * width,
                  "a score for every catalogue item, shape [batch, items] (item id = column "
                  "index; higher is better: top-K = topk of each row)", pad=-1)


def _slots(columns: Sequence[CategoricalColumn]) -> tuple[list[str], list[int], list[slice]]:
    """The sparse input's slot names, id ranges and multi-hot slices for `columns`
    (`tasks.data.column_slots`): `tags` with multi_hot=2 is `tags[0]`, `tags[1]`."""
    spans = [(c, s, c.multi_hot is not None) for c, s in zip(columns, column_slots(columns))]
    names = [f"{c.name}[{i}]" if bag else c.name
             for c, s, bag in spans for i in range(s.stop - s.start)]
    ranges = [c.cardinality for c, s, _ in spans for _ in range(s.stop - s.start)]
    return names, ranges, [s for _, s, bag in spans if bag]


def example_inputs(inputs: Inputs, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid inputs of the model's shape: standard-normal dense values, ids drawn uniformly
    in each column's range (a padded prefix in histories)."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((rows, len(inputs.dense_columns))).astype(np.float32)
    sparse = np.stack([rng.integers(0, max(c, 1), rows) for c in inputs.cardinalities], 1) \
        if inputs.cardinalities else np.zeros((rows, 0), np.int64)
    if inputs.pad is not None:  # a padded prefix of each history or multi-hot column
        for slots in inputs.bags or [slice(0, sparse.shape[1])]:
            width = slots.stop - slots.start
            if width > 1 or inputs.bags:
                lengths = rng.integers(0 if inputs.bags else 1, width + 1, rows)
                part = sparse[:, slots]
                part[np.arange(width)[None, :] < (width - lengths)[:, None]] = inputs.pad
    return torch.from_numpy(dense), torch.from_numpy(sparse.astype(np.int64))


class _Served(nn.Module):
    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.__dict__["program"] = program  # not a child: train()/eval() must not reach it

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.program(*args)


@dataclass
class ServingExport:
    """A model's serving artifact: the program's bytes and serving.json."""

    program: bytes
    serving: dict[str, Any]
    aoti: bytes | None = None
    files: dict[str, bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.files = {PROGRAM: self.program,
                      SERVING: json.dumps(self.serving, indent=2).encode()}
        if self.aoti is not None:
            self.files[AOTI] = self.aoti

    def program_module(self) -> nn.Module:
        """The saved program loaded back, as serving loads it, behind a plain module (the
        program's own module refuses ``.eval()``/``.train()``: its mode is fixed at export)."""
        return _Served(torch.export.load(io.BytesIO(self.program)).module())

    def write(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for name, body in self.files.items():
            (directory / name).write_bytes(body)
            out.append(directory / name)
        return out


def _export(module: nn.Module, args: tuple[Any, ...], dynamic: bool = True,
            ) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() else None
                   for a in args) if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def _culprit(form: nn.Module, args: tuple[torch.Tensor, ...]) -> str:
    """Which module of `form` stops `torch.export`, and why: its submodules are exported one
    by one on the inputs they received in an eager call, deepest first."""
    seen: dict[str, tuple[Any, ...]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, name=name: seen.setdefault(name, a)) for name, m in
        form.named_modules() if name]
    try:
        with torch.no_grad():
            form(*args)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(form.named_modules())
    for name in sorted(seen, key=lambda n: -n.count(".")):
        try:
            _export(modules[name], seen[name], dynamic=False)
        except Exception as exc:  # noqa: BLE001 (any tracing failure names the module)
            return (f"module {name} ({type(modules[name]).__name__}): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return "the model's own forward (every module exports alone)"


def serving_export(model: nn.Module, spec: ModelSpec, data: DatasetSpec,
                   aoti: bool = False, check_rows: int = CHECK_ROWS) -> ServingExport:
    """Export `model` for serving: its serving form captured by `torch.export` with a dynamic
    batch, checked against the eager model on `check_rows` valid rows, and described in
    serving.json. With `aoti`, also an AOTInductor package (compiled for this CPU).

    Raises `ExportError` naming the module that cannot be exported and why."""
    inputs = describe_inputs(spec, data)
    args = example_inputs(inputs, check_rows)
    form = serving_form(model)
    try:
        program = _export(form, args)
    except Exception as exc:  # noqa: BLE001 (reported with the module that causes it)
        raise ExportError(f"cannot export {spec.family} model: {_culprit(form, args)}; "
                          f"torch.export said {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    model = model.cpu().eval()
    with torch.no_grad():
        want = model(*args).float()
        got = program.module()(*args).float()
    diff = float((want - got).abs().max()) if want.numel() else 0.0
    if not math.isfinite(diff):
        raise ExportError(f"{spec.family} model: the exported program's outputs are not finite "
                          "where the eager model's are")
    buf = io.BytesIO()
    torch.export.save(program, buf)
    package = _aoti_package(program) if aoti else None
    serving = {
        "format": "torch.export", "program": PROGRAM, "aoti": AOTI if package else None,
        "torch": torch.__version__.split("+")[0], "family": spec.family,
        "task": spec.problem_kind(),
        "inputs": [
            {"name": "dense", "dtype": "float32", "shape": ["batch", len(inputs.dense_columns)],
             "columns": inputs.dense_columns},
            {"name": "sparse", "dtype": "int64", "shape": ["batch", len(inputs.sparse_columns)],
             "columns": inputs.sparse_columns, "meaning": inputs.sparse_meaning,
             "id_ranges": inputs.cardinalities, **({"pad": inputs.pad} if inputs.pad is not None
                                                   else {})}],
        "output": {"dtype": "float32", "shape": ["batch", *want.shape[1:]],
                   "meaning": inputs.output},
        "batch": {"min": 1, "max": MAX_BATCH},
        "checked": {"rows": check_rows, "max_abs_diff_vs_eager": diff},
        "load": "torch.export.load('model.pt2').module()(dense, sparse)",
    }
    return ServingExport(buf.getvalue(), serving, package)


def export_files(model: nn.Module, spec: ModelSpec, data: DatasetSpec, aoti: bool = False,
                 ) -> tuple[dict[str, bytes], str | None]:
    """A registry version's `export/` files, and why the model could not be exported (None
    when it could). A model that cannot be exported still gets export/serving.json, which
    says why: serving finds the reason where it looks for the program."""
    try:
        files = serving_export(model, spec, data, aoti=aoti).files
    except ExportError as exc:
        reason = str(exc)
        doc = {"format": "torch.export", "program": None, "error": reason}
        return {f"{EXPORT_DIR}/{SERVING}": json.dumps(doc, indent=2).encode()}, reason
    return {f"{EXPORT_DIR}/{name}": body for name, body in files.items()}, None


def _aoti_package(program: torch.export.ExportedProgram) -> bytes:
    """The program compiled ahead of time for this CPU (AOTInductor); its bytes."""
    import tempfile

    from torch._inductor import aoti_compile_and_package

    with tempfile.TemporaryDirectory() as tmp:
        path = aoti_compile_and_package(program, package_path=str(Path(tmp) / AOTI))
        return Path(path).read_bytes()
