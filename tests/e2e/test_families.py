"""Every model family end to end on the real stack (S3, Prefect server, 2-node Ray): the
two-tower retriever, the SASRec sequential recommender, and a user's own model class defined
outside the package (tests/user_models), each with every stage that applies to it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.driver import run_compress
from tasks.artifacts import ArtifactStore
from tasks.data import to_arrays
from tasks.defaults import default_candidates
from tasks.evaluate import predict
from tasks.quality import quality
from tasks.registry import Registry
from tasks.serving import version_export
from tasks.types import (
    Candidate,
    CompressionRequest,
    CustomSpec,
    DatasetRequest,
    DistillConfig,
    FactorizeConfig,
    MixedPrecision,
    PruneConfig,
    QuantizeConfig,
    Resources,
    SasrecSpec,
    TrainConfig,
    TwoTowerSpec,
)
from tests.serving_check import score_without_recsqueeze, write_inputs

pytestmark = [pytest.mark.slow, pytest.mark.integration]
# these tests check what the flow does with latencies, not how narrow their intervals get
QUICK_TIMING = Resources(timing_seconds=5)

TINY = DatasetRequest(builtin="tiny")
# the stages the default plans of the retrieval families leave out: calibration + mixed
# precision, magnitude pruning (CSR), table rows by norm
EXTRA = (Candidate(id="mixed", plan=(QuantizeConfig(mixed_precision=MixedPrecision()),)),
         Candidate(id="sparse", plan=(PruneConfig(method="magnitude", sparsity=0.6),)),
         Candidate(id="rows", plan=(PruneConfig(method="embedding_rows", criterion="norm"),)))
EXTRA_IDS = {c.id for c in EXTRA}


def _reproduce(report, settings, name: str) -> None:
    """The promoted model, loaded from the registry, scores the test split as reported."""
    model, spec = Registry(ArtifactStore(settings)).load(name, report.promoted.version)
    test = to_arrays(ArtifactStore(settings).read_split(report.dataset, "test"), report.dataset.spec,
                     spec.problem_kind(), spec.history_width())
    row = next(r for r in report.leaderboard if r.candidate == report.promoted.candidate_id)
    measured, _ = quality(spec.problem_kind(), test, predict(model, test))
    assert measured[row.metric].value == pytest.approx(row.quality, abs=1e-9)
    # its serving export, promoted beside it, ranks the test rows as it does with torch alone
    files, source = version_export(Registry(ArtifactStore(settings)), name,
                                   report.promoted.version)
    assert source == "registry" and json.loads(files["serving.json"]).get("error") is None
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-export-"))
    for file, body in files.items():
        (folder / file).write_bytes(body)
    write_inputs(folder, test.dense, test.sparse)
    got = score_without_recsqueeze([folder])[folder]
    with torch.no_grad():
        want = model(torch.from_numpy(test.dense), torch.from_numpy(test.sparse)).numpy()
    assert got.shape == want.shape and abs(got - want).mean() <= 1e-4
    if got.ndim == 2:  # retrieval: the same top 10 items
        top = np.argsort(-got, 1)[:, :10] == np.argsort(-want, 1)[:, :10]
        assert top.mean() >= 0.999, top.mean()


def test_two_tower_retrieval_end_to_end(stack, settings):
    defaults = CompressionRequest(model=TwoTowerSpec())
    assert [c.id for c in defaults.candidates] == [c.id for c in default_candidates("two_tower")]
    request = CompressionRequest(
        resources=QUICK_TIMING,
        model_name="e2e-retriever", model=TwoTowerSpec(), dataset=TINY,
        train=TrainConfig(epochs=3, batch_size=256),
        candidates=(*default_candidates("two_tower"), *EXTRA),
        budget={"metrics": {"main": {"max_drop": 0.05, "relative": True}}})
    report = run_compress(request, settings)
    assert not report.failures and not report.skipped, (report.failures, report.skipped)
    rows = {r.candidate: r for r in report.leaderboard}
    # every stage kind ran: calibrate + quantize (towers + item index, mixed precision),
    # prune (structured, magnitude, rows), factorize (low rank, TT), distill
    assert set(rows) == {*(c.id for c in default_candidates("two_tower")), *EXTRA_IDS}
    assert all(r.metric == "recall@50" for r in rows.values())
    assert rows["int8-all"].size_ratio > 3.0 and rows["int4-emb"].size_ratio > rows[
        "int8-all"].size_ratio
    assert rows["tt-int8"].size_ratio > 2.0  # tiny tables: TT pays off on larger ones
    assert rows["student-half"].size_ratio > 1.5
    assert report.baseline.main == "recall@50" and report.baseline.logloss is None
    assert {"recall@10", "ndcg@10", "recall@50[item_popularity=tail]",
            "ndcg@10[user_type=new]"} <= set(report.baseline.quality)
    assert report.status == "promoted", report.reason
    _reproduce(report, settings, "e2e-retriever")


def test_sasrec_end_to_end_with_a_segment_budget(stack, settings):
    request = CompressionRequest(
        resources=QUICK_TIMING,
        model_name="e2e-sequential", model=SasrecSpec(max_history=20),
        dataset=TINY, train=TrainConfig(epochs=1, batch_size=256),
        candidates=(*default_candidates("sasrec"), *EXTRA,
                    Candidate(id="tt-items", plan=(FactorizeConfig(
                        target="tt_embeddings", rank=16, finetune_epochs=1),))),
        budget={"metrics": {"main": {"max_drop": 0.05, "relative": True},
                            "hr@10[user_type=returning]": {"max_drop": 0.05}}},
        # on `tiny` this SASRec baseline does not beat the popularity ranking yet (the
        # generator's clicks carry little sequential signal: issue 12 item 4); this test is
        # about the stages, so it goes on as an expert would - and the check is reported
        require_useful_baseline=False)
    report = run_compress(request, settings)
    assert [t.name for t in report.trivial] == ["popularity"] and report.status != "stopped"
    assert not report.failures and not report.skipped, (report.failures, report.skipped)
    rows = {r.candidate: r for r in report.leaderboard}
    assert set(rows) == {*(c.id for c in default_candidates("sasrec")), *EXTRA_IDS, "tt-items"}
    assert all(r.metric == "ndcg@10" for r in rows.values())
    # fewer heads / FFN channels and one layer instead of two: measurably smaller
    assert rows["pruned-heads-ffn"].size_ratio > 1.0
    assert rows["student-1layer"].size_ratio > 1.3
    assert rows["lowrank-attn-ffn"].size_ratio > 1.0
    # a candidate over the segment budget says so, by name
    for r in rows.values():
        if not r.passed:
            assert any(reason.startswith(("ndcg@10", "hr@10[user_type=returning]"))
                       for reason in r.reasons), r.reasons
    if report.promoted:
        _reproduce(report, settings, "e2e-sequential")


def test_budget_naming_an_unknown_segment_fails_before_training(stack, settings):
    request = CompressionRequest(
        resources=QUICK_TIMING,
        model_name="e2e-bad-segment", dataset=TINY, train=TrainConfig(epochs=1),
        candidates=(Candidate(id="int8", plan=(QuantizeConfig(),)),),
        budget={"metrics": {"auc[country=de]": {"max_drop": 0.002}}})
    with pytest.raises(Exception, match=r"budget.metrics\['auc\[country=de\]'\]: 'country' is "
                                        "not a segment column"):
        run_compress(request, settings)
    assert Registry(ArtifactStore(settings)).versions("e2e-bad-segment") == []


def test_ranker_tail_item_budget_and_session_ndcg(stack, settings):
    request = CompressionRequest(
        resources=QUICK_TIMING,
        model_name="e2e-tail", dataset=TINY, train=TrainConfig(epochs=2, batch_size=512),
        candidates=(Candidate(id="int8-all", plan=(QuantizeConfig(),)),
                    Candidate(id="int2-emb", plan=(QuantizeConfig(linear="none",
                                                                  embeddings="rowwise_int2"),))),
        budget={"metrics": {"auc[item_popularity=tail]": {"max_drop": 0.002},
                            "ndcg@10": {"max_drop": 0.01, "relative": True}}})
    report = run_compress(request, settings)
    for row in report.leaderboard:
        result_deltas = {r for r in row.reasons}
        assert row.passed == (not result_deltas)
        assert all(r.startswith(("auc[item_popularity=tail]", "ndcg@10")) for r in row.reasons)
    assert {"auc[item_popularity=tail]", "auc[item_popularity=head]", "ndcg@10"} <= set(
        report.baseline.quality)


def test_a_user_model_class_from_outside_the_package_is_compressed(stack, settings):
    user = CustomSpec(task="ranking", embedding_dim=16,
                      class_path="tests.user_models.shop_ranker:ShopRanker",
                      options={"hidden": 64})
    student = user.model_copy(update={"embedding_dim": 8, "options": {"hidden": 16}})
    request = CompressionRequest(
        resources=QUICK_TIMING,
        model_name="e2e-user-model", model=user, dataset=TINY,
        train=TrainConfig(epochs=2, batch_size=512),
        candidates=(*default_candidates("custom"),
                    Candidate(id="pruned", plan=(PruneConfig(method="structured"),)),
                    Candidate(id="lowrank", plan=(FactorizeConfig(target="linear", rank=8),)),
                    Candidate(id="student", plan=(DistillConfig(student=student),))),
        budget={"metrics": {"main": {"max_drop": 0.01, "relative": True}}},
        # this wide & deep, two epochs on `tiny`, does not beat the item-CTR prior (AUC ~0.63
        # vs 0.655): the test is about compressing a user's class, so it goes on as an expert
        # would; the comparison is still measured and reported
        require_useful_baseline=False)
    report = run_compress(request, settings)
    assert {t.name for t in report.trivial} == {"global_ctr", "item_ctr"}
    assert not report.failures, report.failures
    rows = {r.candidate: r for r in report.leaderboard}
    assert set(rows) == {"int8-all", "int8-emb", "int4-emb", "pruned", "lowrank", "student"}
    # 16-wide tables: 16 int8 codes + 8 bytes of scale/offset per row; the width-1 "wide"
    # tables stay fp32 (quantized they would grow)
    assert rows["int8-all"].size_ratio > 2.3 and rows["student"].size_ratio > 1.5
    assert report.status == "promoted", report.reason
    model, spec = Registry(ArtifactStore(settings)).load("e2e-user-model",
                                                         report.promoted.version)
    assert type(model).__module__ == "tests.user_models.shop_ranker"
    assert spec.class_path == user.class_path
    _reproduce(report, settings, "e2e-user-model")
    assert isinstance(model, torch.nn.Module)


def test_the_documented_byo_data_path_from_a_csv_to_a_promoted_model(stack, settings, tmp_path):
    """docs/byo-data.md, as a new user runs it: a CSV of their own (here the tiny click log
    written out as one file, history and the multi-hot column as space-separated ids, plus a
    free-text column), a spec.json, `dataset import`, then a request that names only
    dataset.uri."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pcsv

    from tasks.data import SPLITS
    from tasks.dataimport import import_dataset
    from tasks.generator import generate

    tables, spec = generate("tiny", seed=3)
    table = pa.concat_tables([tables[s] for s in SPLITS])
    # as docs/byo-data.md says: a list column (history, a multi-hot column) is a CSV cell of
    # space-separated ids
    for name in [f.name for f in table.schema if pa.types.is_list(f.type)]:
        cells = [" ".join(map(str, ids)) for ids in table[name].to_pylist()]
        table = table.drop([name]).append_column(name, pa.array(cells))
    table = table.append_column("title", pa.array(["free text"] * table.num_rows))
    pcsv.write_csv(table, tmp_path / "clicks.csv")
    raw = spec.model_dump(mode="json", exclude={"bayes_auc"})
    (tmp_path / "spec.json").write_text(json.dumps({**raw, "name": "shop-clicks"}))
    ref = import_dataset(tmp_path / "spec.json", tmp_path / "clicks.csv", settings)
    request = CompressionRequest.model_validate({
        "model_name": "byo-shop", "model": {"family": "two_tower"},
        "dataset": {"uri": ref.uri}, "train": {"epochs": 2, "batch_size": 256},
        "candidates": [c.model_dump(mode="json") for c in default_candidates("two_tower")[:2]],
        "budget": {"metrics": {"main": {"max_drop": 0.05, "relative": True}}}})
    report = run_compress(request, settings)
    assert report.dataset.uri == ref.uri and report.dataset.spec.bayes_auc is None
    assert not report.failures and report.status == "promoted", (report.failures, report.reason)
    _reproduce(report, settings, "byo-shop")
