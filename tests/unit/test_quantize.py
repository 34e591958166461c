import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tasks.artifacts import deserialize_model, serialize_model
from tasks.data import Arrays, to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.modules import (
    DynamicInt8Linear,
    HalfEmbedding,
    RowWiseQuantEmbedding,
    WeightOnlyLinear,
    manifest_of,
)
from tasks.stages import StageContext, apply_stage, calibrate
from tasks.types import CalibrateConfig, DlrmSpec, MixedPrecision, QuantizeConfig

SPEC = DlrmSpec(embedding_dim=16, bottom_mlp=(32, 16), top_mlp=(32,))
ALL_CONFIGS = [
    QuantizeConfig(),
    QuantizeConfig(linear="static_int8", embeddings="none"),
    QuantizeConfig(linear="int8_weight_only", embeddings="none"),
    QuantizeConfig(linear="int4_weight_only", embeddings="none"),
    QuantizeConfig(linear="int4_weight_only", group_size=16, embeddings="none"),
    QuantizeConfig(linear="none", embeddings="rowwise_int4"),
    QuantizeConfig(linear="none", embeddings="rowwise_int4", row_range="minmax"),
    QuantizeConfig(linear="none", embeddings="rowwise_int2"),
    QuantizeConfig(linear="fp16", embeddings="fp16"),
    QuantizeConfig(linear="bf16", embeddings="bf16"),
    QuantizeConfig(mixed_precision=MixedPrecision()),
]


@pytest.fixture(scope="module")
def setup():
    tables, data_spec = generate("tiny", 0)
    spec = resolve(SPEC, data_spec)
    from tasks.train import train
    from tasks.types import TrainConfig

    model = train(build(spec), to_arrays(tables["train"], data_spec),
                  TrainConfig(epochs=1, batch_size=256))
    valid = to_arrays(tables["valid"], data_spec)
    cal = calibrate(model, CalibrateConfig(rows=2000, sensitivity_rows=4000),
                    StageContext(calibration=lambda: valid))
    ctx = StageContext(calibration=lambda: valid, activations=lambda: cal.activations,
                       sensitivity=lambda: cal.sensitivity, max_relative_loss=0.01)
    return model, spec, valid, ctx, cal


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.label())
def test_every_config_changes_the_model_and_round_trips(setup, cfg):
    model, spec, valid, ctx, _ = setup
    assert QuantizeConfig.model_validate_json(cfg.model_dump_json()) == cfg
    q = apply_stage(model, cfg, ctx)
    assert isinstance(model.embeddings[0], nn.Embedding)  # input untouched
    blob = serialize_model(q, spec)
    assert len(blob) < len(serialize_model(model, spec))
    loaded, _ = deserialize_model(blob)
    p_base, p_q, p_loaded = predict(model, valid), predict(q, valid), predict(loaded, valid)
    assert (p_q == p_loaded).all()
    assert abs(p_base - p_q).max() < 0.1
    assert manifest_of(q)


def test_packed_sizes_are_real(setup):
    model, spec, *_ = setup
    base = len(serialize_model(model, spec))
    sizes = {bits: len(serialize_model(apply_stage(model, QuantizeConfig(
        linear="none", embeddings=f"rowwise_int{bits}"), StageContext()), spec)) for bits in (8, 4, 2)}
    assert sizes[8] > sizes[4] > sizes[2]
    emb = apply_stage(model, QuantizeConfig(linear="none", embeddings="rowwise_int4"),
                      StageContext()).embeddings[0]
    assert isinstance(emb, RowWiseQuantEmbedding) and emb.packed.shape[1] == 16 // 2 + 4
    assert base / sizes[2] > 5


def test_group_wise_weight_only_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    x = torch.randn(32, 64)
    errs = {}
    for g in (None, 16):
        q = WeightOnlyLinear.from_float(lin, 4, g)
        assert q.scale.shape == (8, 64 // (g or 64))
        errs[g] = (q(x) - lin(x)).norm() / lin(x).norm()
    assert errs[16] < errs[None] < 0.2  # smaller groups, finer scales


def test_int4_weight_only_stores_two_codes_per_byte(setup):
    model, *_ = setup
    q = apply_stage(model, QuantizeConfig(linear="int4_weight_only", embeddings="none"),
                    StageContext())
    layer = q.top[0]
    assert isinstance(layer, WeightOnlyLinear) and layer.codes.dtype == torch.uint8
    assert layer.codes.shape[1] == (model.top[0].in_features + 1) // 2


def test_rowwise_int4_mse_beats_one_shot_minmax(setup):
    model, *_ = setup
    w = model.embeddings[0].weight.detach()
    errs = {r: (RowWiseQuantEmbedding.from_float(w, 4, r).dequantize() - w).pow(2).mean()
            for r in ("minmax", "mse")}
    assert errs["mse"] < errs["minmax"]


class TwoTables(nn.Module):
    """Logit = signal in column 1 of table 0 + signal in column 1 of table 1."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = DlrmSpec()  # a ranker: predict reads the problem kind from the spec
        self.embeddings = nn.ModuleList([nn.Embedding(200, 8), nn.Embedding(200, 8)])
        self.head = nn.Linear(16, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([e(sparse[:, i]) for i, e in enumerate(self.embeddings)], dim=1)
        return self.head(x).squeeze(1)


def test_sensitivity_ranks_a_deliberately_fragile_table_first():
    g = torch.Generator().manual_seed(0)
    model = TwoTables()
    with torch.no_grad():
        for e in model.embeddings:
            e.weight.copy_(torch.randn(200, 8, generator=g) * 0.1)
            e.weight[:, 1] = torch.randn(200, generator=g)  # the signal
        model.embeddings[1].weight[:, 0] = 1000.0  # fragile: one huge value in every row
        model.head.weight.zero_()
        model.head.weight[0, 1] = model.head.weight[0, 9] = 2.0
        model.head.bias.zero_()
    ids = torch.randint(0, 200, (20_000, 2), generator=g)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.zeros(20_000, 0), ids))
    label = (torch.rand(20_000, generator=g) < p).float().numpy()
    data = Arrays(torch.zeros(20_000, 0).numpy(), ids.numpy(), label)
    cal = calibrate(model, CalibrateConfig(rows=1000, sensitivity_rows=20_000),
                    StageContext(calibration=lambda: data))
    rows = [r for r in cal.sensitivity.to_pylist() if r["choice"].startswith("rowwise")]
    ranked = sorted(rows, key=lambda r: -r["loss"])
    assert ranked[0]["module"] == "embeddings.1", ranked[:3]
    loss = {(r["module"], r["choice"]): r["loss"] for r in rows}
    assert loss[("embeddings.1", "rowwise_int4")] > 10 * max(loss[("embeddings.0", "rowwise_int4")], 1e-4)


def test_calibration_tables_have_ranges_for_every_linear(setup):
    model, *_, cal = setup
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert cal.activations.num_rows == 2 * n_linear
    for r in cal.activations.to_pylist():
        assert r["min"] <= r["mse_lo"] <= r["mse_hi"] <= r["max"] + 1e-6
        assert sum(r["hist_counts"]) == r["count"]


def test_mixed_precision_respects_budget_and_shrinks(setup):
    model, spec, valid, ctx, cal = setup
    q = apply_stage(model, QuantizeConfig(mixed_precision=MixedPrecision()), ctx)
    chosen = {p: m for p, m in q.named_modules()
              if isinstance(m, (RowWiseQuantEmbedding, DynamicInt8Linear, HalfEmbedding))}
    assert chosen
    sens = {(r["module"], r["choice"]): r["relative_loss"] for r in cal.sensitivity.to_pylist()}
    spent = 0.0
    for path, m in chosen.items():
        choice = {8: "rowwise_int8", 4: "rowwise_int4", 2: "rowwise_int2"}[m.bits] \
            if isinstance(m, RowWiseQuantEmbedding) else "dynamic_int8"
        spent += max(0.0, sens[(path, choice)])
    assert spent <= 0.01 * 0.5 + 1e-12


@pytest.mark.parametrize("raw, message", [
    ({"linear": "int8_weight_only", "group_size": 0}, "greater than 0"),
    ({"linear": "dynamic_int8", "group_size": 32}, "group_size applies to int8/int4_weight_only"),
    ({"embeddings": "rowwise_int3"}, "embeddings"),
    ({"linear": "int2_weight_only"}, "int2 is for embedding tables only"),
    ({"linear": "none", "embeddings": "none"}, "both 'none'"),
])
def test_bad_configs_fail_clearly(raw, message):
    with pytest.raises(ValidationError, match=message):
        QuantizeConfig.model_validate(raw)


def test_group_size_not_dividing_a_layer_names_the_layer(setup):
    model, *_ = setup
    with pytest.raises(ValueError, match=r"does not divide the width 32 of layer bottom.2"):
        apply_stage(model, QuantizeConfig(linear="int4_weight_only", group_size=24,
                                          embeddings="none"), StageContext())
    q = apply_stage(model, QuantizeConfig(linear="int4_weight_only", group_size=16,
                                          embeddings="none"), StageContext())
    assert q.bottom[0].scale.shape[1] == 1 and q.bottom[2].scale.shape[1] == 2


def test_static_int8_without_calibration_says_what_to_do(setup):
    model, *_ = setup
    with pytest.raises(ValueError, match="run the calibrate stage first"):
        apply_stage(model, QuantizeConfig(linear="static_int8"), StageContext())


def test_quantize_leaves_global_torch_settings_untouched(setup):
    model, *_ = setup
    before = (torch.get_num_threads(), torch.get_default_dtype(),
              torch.backends.quantized.engine, torch.is_grad_enabled())
    apply_stage(model, QuantizeConfig(), StageContext())
    assert before == (torch.get_num_threads(), torch.get_default_dtype(),
                      torch.backends.quantized.engine, torch.is_grad_enabled())


def test_serialization_is_byte_identical_across_processes(setup):
    # Regression: safetensors' header order changed per process, so the same weights got a
    # different sha256 on every Ray worker and content-addressed caching never hit.
    import subprocess
    import sys

    code = ("import hashlib,torch;from tasks.artifacts import serialize_model;"
            "from tasks.models import build;from tasks.types import DlrmSpec,TableSpec;"
            "s=DlrmSpec(embedding_dim=8,bottom_mlp=(8,),top_mlp=(8,),num_dense=2,"
            "tables=tuple(TableSpec(name=f't{i}',rows=10) for i in range(6)));"
            "print(hashlib.sha256(serialize_model(build(s,3),s)).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout for _ in range(3)}
    assert len(digests) == 1


@pytest.mark.parametrize("dim", [1, 3, 5])
@pytest.mark.parametrize("bits", [4, 2])
def test_sub_byte_tables_of_any_width_pad_and_round_trip(dim, bits):
    # a user model's width-1 "wide" table, or an odd width: packed with zero-code padding
    from tasks.modules import RowWiseQuantEmbedding

    w = torch.randn(40, dim)
    table = RowWiseQuantEmbedding.from_float(w, bits, "minmax")
    ids = torch.tensor([[0, 3], [7, 39]])
    assert table(ids).shape == (2, 2, dim)
    assert torch.allclose(table(ids), table.dequantize()[ids], atol=1e-5)
    step = (w.max(1).values - w.min(1).values) / (2**bits - 1)
    assert ((table.dequantize() - w).abs() <= step[:, None] / 2 + 1e-3).all()


def test_a_table_that_quantization_would_grow_is_left_as_it_is():
    from torch import nn

    from tasks.stages import StageContext, apply_stage

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wide, self.deep = nn.Embedding(100, 1), nn.Embedding(100, 16)

    out = apply_stage(Wide(), QuantizeConfig(linear="none", embeddings="rowwise_int8"),
                      StageContext())
    assert type(out.wide) is nn.Embedding  # 1 code + 8 bytes of scale/offset > 4 bytes
    assert type(out.deep).__name__ == "RowWiseQuantEmbedding"


def test_dynamic_int8_off_cpu_emulates_the_cpu_kernel():
    # a CUDA worker has no fbgemm kernel: the fallback fake-quantizes the input as fbgemm's
    # dynamic linear does (per-tensor uint8, reduced range) and must give the same numbers
    import torch.nn.functional as F
    from torch import nn

    from tasks.modules.linear import DynamicInt8Linear, _dynamic_fake_quant

    torch.manual_seed(0)
    layer = DynamicInt8Linear.from_float(nn.Linear(64, 32))
    with torch.no_grad():
        for x in (torch.randn(512, 64), torch.rand(512, 64) * 3, torch.randn(3, 20, 64)):
            emulated = F.linear(_dynamic_fake_quant(x), layer.dequantized_weight(), layer.bias)
            torch.testing.assert_close(layer(x), emulated, atol=1e-5, rtol=0)
