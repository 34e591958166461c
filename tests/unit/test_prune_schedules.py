"""Gradual and hybrid pruning, 2:4 semi-structured sparsity, TT factorization as a stage."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tasks.artifacts import deserialize_model, serialize_model
from tasks.evaluate import dense_flops, embedding_bytes, predict
from tasks.modules import PrunedLinear, SemiSparseLinear, SparseLinear, TTEmbedding
from tasks.stages import apply_stage
from tasks.stages.context import StageSkipped
from tasks.stages.prune import schedule
from tasks.types import FactorizeConfig, PruneConfig


def test_cubic_schedule_rises_fast_then_levels_off():
    assert schedule(0.5, 1) == [0.5]
    s = schedule(0.8, 4)
    assert s[-1] == pytest.approx(0.8) and s == sorted(s)
    assert s[0] == pytest.approx(0.8 * (1 - 0.75**3)) and s[1] - s[0] > s[3] - s[2]


def test_gradual_structured_pruning_reaches_the_target_widths(tiny_dlrm):
    model, spec, valid, ctx = tiny_dlrm
    pruned = apply_stage(model, PruneConfig(method="structured", sparsity=0.75, steps=3), ctx)
    assert isinstance(pruned.top[0], PrunedLinear)
    assert pruned.top[0].out_features == 16 and pruned.top[2].out_features == 8
    loaded, _ = deserialize_model(serialize_model(pruned, spec))
    assert (predict(loaded, valid) == predict(pruned, valid)).all()


def test_gradual_magnitude_pruning_keeps_earlier_zeros_and_stores_sparsely(tiny_dlrm):
    model, spec, valid, ctx = tiny_dlrm
    pruned = apply_stage(model, PruneConfig(method="magnitude", sparsity=0.8, steps=3), ctx)
    sparse = [m for m in pruned.modules() if isinstance(m, SparseLinear)]
    assert sparse and not any(hasattr(m, "weight_mask") for m in pruned.modules())
    total = sum(m.in_features * m.out_features for m in sparse)
    kept = sum(m.values.numel() for m in sparse)
    assert kept / total == pytest.approx(0.2, abs=0.02)
    assert len(serialize_model(pruned, spec)) < len(serialize_model(model, spec))
    loaded, _ = deserialize_model(serialize_model(pruned, spec))
    assert (predict(loaded, valid) == predict(pruned, valid)).all()


def test_hybrid_chain_structured_then_unstructured(tiny_dlrm):
    model, _, _, ctx = tiny_dlrm
    structured = apply_stage(model, PruneConfig(method="structured", sparsity=0.5), ctx)
    hybrid = apply_stage(structured, PruneConfig(method="magnitude", sparsity=0.5), ctx)
    assert dense_flops(hybrid) < dense_flops(structured) < dense_flops(model)
    assert any(isinstance(m, SparseLinear) and m.out_features == 32 for m in hybrid.modules())


def test_two_four_pattern_storage_and_round_trip():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    sparse = SemiSparseLinear.from_linear(linear)
    w = sparse.dense_weight()
    groups = w.reshape(32, 16, 4)
    assert ((groups != 0).sum(-1) == 2).all()  # exactly 2 of every 4 kept
    ref = linear.weight.detach().reshape(32, 16, 4)
    top2 = ref.abs().topk(2, dim=-1).values.sum(-1)
    torch.testing.assert_close(groups.abs().sum(-1), top2)  # the largest two were kept
    x = torch.randn(5, 64)
    torch.testing.assert_close(sparse(x), nn.functional.linear(x, w, linear.bias))
    stored = sum(t.numel() * t.element_size() for t in sparse.state_dict().values())
    assert stored < 0.6 * sum(t.numel() * 4 for t in linear.state_dict().values())
    model = nn.Sequential(sparse)
    rebuilt = nn.Sequential(nn.Linear(64, 32))
    from tasks.modules import apply_manifest, manifest_of

    apply_manifest(rebuilt, manifest_of(model)).load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))
    assert dense_flops(model) == 32 * 64 // 2


def test_two_four_is_skipped_cleanly_without_a_gpu(tiny_dlrm):
    model, _, _, ctx = tiny_dlrm
    with pytest.raises(StageSkipped, match="needs a CUDA worker"):
        apply_stage(model, PruneConfig(method="semi_structured", sparsity=0.5), ctx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 kernels need a CUDA GPU")
def test_two_four_runs_on_sparse_tensor_cores():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("sparse tensor cores need compute capability >= 8.0")
    linear = nn.Linear(128, 64).cuda()
    sparse = SemiSparseLinear.from_linear(linear).cuda()
    x = torch.randn(256, 128, device="cuda")
    with torch.inference_mode():
        got = sparse(x)
    assert sparse._sparse is not None  # the sparse kernel ran
    want = nn.functional.linear(x, sparse.dense_weight(), sparse.bias)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # fp16 kernel


@pytest.mark.parametrize(("raw", "message"), [
    ({"method": "semi_structured", "sparsity": 0.7}, "must be 0.5 for semi_structured"),
    ({"method": "embedding_rows", "steps": 3}, "one-shot"),
    ({"steps": 0}, "steps"),
])
def test_bad_schedules_fail_clearly(raw, message):
    with pytest.raises(ValidationError, match=message):
        PruneConfig.model_validate(raw)


def test_tt_factorize_stage_shrinks_tables_and_round_trips(tiny_dlrm):
    model, spec, valid, ctx = tiny_dlrm
    out = apply_stage(model, FactorizeConfig(target="tt_embeddings", rank=4), ctx)
    tts = [m for m in out.modules() if isinstance(m, TTEmbedding)]
    assert tts and max(max(t.ranks) for t in tts) <= 4
    assert embedding_bytes(out) < embedding_bytes(model) / 3
    loaded, _ = deserialize_model(serialize_model(out, spec))
    assert (predict(loaded, valid) == predict(out, valid)).all()
    assert FactorizeConfig(target="tt_embeddings", rank=4).label() == "factorize(tt@4)"


@pytest.mark.parametrize("target", ["linear", "embeddings", "tt_embeddings"])
def test_parameter_budget_sets_the_rank(tiny_dlrm, target):
    model, _, _, ctx = tiny_dlrm
    out = apply_stage(model, FactorizeConfig(target=target, param_budget=0.3,
                                             finetune_epochs=0), ctx)
    changed = [(name, m) for name, m in out.named_modules()
               if type(m).__name__ in ("LowRankLinear", "LowRankEmbedding", "TTEmbedding")]
    assert changed
    for name, m in changed:
        before = model.get_submodule(name.removesuffix(".table"))  # a bag's table: the bag's
        n_before = sum(p.numel() for p in before.parameters())
        n_after = sum(p.numel() for p in m.parameters())
        assert n_after <= 0.3 * n_before + (m.second.bias.numel() if target == "linear" else 0)


def test_rank_and_parameter_budget_are_exclusive():
    with pytest.raises(ValidationError, match="rank or param_budget, not both"):
        FactorizeConfig(rank=4, param_budget=0.5)
    with pytest.raises(ValidationError, match="param_budget"):
        FactorizeConfig(param_budget=1.0)
