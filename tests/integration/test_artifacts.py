"""Artifact store and registry against a real SeaweedFS S3 server."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from tasks.artifacts import IntegrityError, UnsafeArtifactError
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.registry import Registry
from tasks.types import DlrmSpec

pytestmark = pytest.mark.integration


def _model():
    _, spec = generate("tiny", 0)
    ms = resolve(DlrmSpec(embedding_dim=8, bottom_mlp=(8,), top_mlp=(8,)), spec)
    return build(ms), ms


def test_blob_round_trip_and_idempotent(store):
    ref = store.put_blob(b"hello recsqueeze", "json")
    assert store.get_blob(ref) == b"hello recsqueeze"
    assert store.put_blob(b"hello recsqueeze", "json") == ref
    assert ref.uri.endswith(f"objects/{ref.sha256}") and ref.size_bytes == 16


def test_model_round_trip(store):
    model, spec = _model()
    ref = store.put_model(model, spec)
    loaded, spec2 = store.get_model(ref)
    assert spec2 == spec
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_corruption_is_detected(store):
    ref = store.put_blob(b"precious weights" * 100, "model")
    key = ref.uri.split("/", 3)[3]
    store.s3.put_object(Bucket=store.bucket, Key=key, Body=b"tampered weights" * 100)
    with pytest.raises(IntegrityError, match="sha256"):
        store.get_blob(ref)


def test_pickle_offered_as_model_is_refused(store):
    model, _ = _model()
    buf = io.BytesIO()
    torch.save(model, buf)  # a full pickle: would execute code on load
    ref = store.put_blob(buf.getvalue(), "model")
    with pytest.raises(UnsafeArtifactError, match="not safetensors"):
        store.get_model(ref)
    import pickle

    ref = store.put_blob(pickle.dumps({"evil": 1}), "model")
    with pytest.raises(UnsafeArtifactError, match="pickle"):
        store.get_model(ref)


def test_registry_versions_are_immutable_and_concurrent_promotions_distinct(store):
    model, spec = _model()
    ref = store.put_model(model, spec)
    reg = Registry(store)
    results = []

    def publish(i: int) -> None:
        results.append(reg.publish("concurrent", ref, {"note.json": {"i": i}}, f"t{i}", "c"))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = sorted(p.version for p in results)
    assert versions == [1, 2, 3, 4]
    assert reg.versions("concurrent") == [1, 2, 3, 4]
    assert reg.alias("concurrent") in versions
    # the alias pair is consistent: previous is another promoted version, never production
    assert reg.alias("concurrent", "previous") in set(versions) - {reg.alias("concurrent")}
    notes = {store.get_json(f"registry/concurrent/versions/{v}/note.json")["i"] for v in versions}
    assert notes == {0, 1, 2, 3}  # nobody overwrote anybody
    loaded, _ = reg.load("concurrent", 2)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_half_written_version_is_never_listed_or_reused(store):
    model, spec = _model()
    ref = store.put_model(model, spec)
    reg = Registry(store)
    # a promotion that died after claiming version 1
    store.s3.put_object(Bucket=store.bucket, Key="registry/crashy/versions/1/claim.json",
                        Body=b"{}")
    assert reg.versions("crashy") == []
    promo = reg.publish("crashy", ref, {}, "t", "c")
    assert promo.version == 2 and reg.versions("crashy") == [2]


def test_promote_and_rollback_move_production_and_previous_together(store):
    model, spec = _model()
    ref = store.put_model(model, spec)
    reg = Registry(store)
    for i in range(3):  # three runs (one owner = one promotion, retries included)
        reg.publish("rolly", ref, {}, f"t{i}", "c")
    assert (reg.alias("rolly"), reg.alias("rolly", "previous")) == (3, 2)
    assert reg.rollback("rolly") == (2, 3)
    assert (reg.alias("rolly"), reg.alias("rolly", "previous")) == (2, 3)
    assert reg.rollback("rolly") == (3, 2)  # roll forward again
    reg.set_alias("rolly", "production", 1)
    assert (reg.alias("rolly"), reg.alias("rolly", "previous")) == (1, 3)
    reg.set_alias("rolly", "production", 1)  # already there: nothing moves
    assert reg.alias("rolly", "previous") == 3
    assert reg.versions("rolly") == [1, 2, 3]  # versions themselves never change
    with pytest.raises(ValueError, match="version 9 does not exist"):
        reg.set_alias("rolly", "production", 9)
    reg.publish("single", ref, {}, "t", "c")
    with pytest.raises(ValueError, match="no previous version to roll back to"):
        reg.rollback("single")


def test_concurrent_alias_moves_leave_a_consistent_pair(store):
    model, spec = _model()
    ref = store.put_model(model, spec)
    reg = Registry(store)
    for i in range(5):
        reg.publish("racy", ref, {}, f"t{i}", "c", set_production=False)
    threads = [threading.Thread(target=reg.set_alias, args=("racy", "production", v))
               for v in range(1, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    production, previous = reg.alias("racy"), reg.alias("racy", "previous")
    # every move read the alias it replaced under a compare-and-swap: the last writer's
    # previous is the version the second-to-last move set, so the two always differ
    assert production in range(1, 6) and previous in range(1, 6) and previous != production


def test_a_retried_promotion_is_one_version_and_the_alias_move_is_a_compare_and_swap(store):
    from tasks.registry import AliasMoved

    model, spec = _model()
    ref = store.put_model(model, spec)
    reg = Registry(store)
    first = reg.publish("cas", ref, {"note.json": {"n": 1}}, "run-a/c", "c",
                        expected_production=None)
    again = reg.publish("cas", ref, {"note.json": {"n": 1}}, "run-a/c", "c",
                        expected_production=None)  # a retry after the seal
    assert first == again and reg.versions("cas") == [1] and reg.alias("cas") == 1
    keys = {o["Key"] for o in store.s3.list_objects_v2(Bucket=store.bucket,
                                                       Prefix="registry/cas/")["Contents"]}
    # another run measured "no production yet"; production is v1 now: refused, nothing written
    with pytest.raises(AliasMoved, match=r"^production moved from no version to v1 during "
                                         r"this run; rerun to judge the candidates against v1$"):
        reg.publish("cas", ref, {}, "run-b/c", "c", expected_production=None)
    assert {o["Key"] for o in store.s3.list_objects_v2(
        Bucket=store.bucket, Prefix="registry/cas/")["Contents"]} == keys
    # a run that measured v1 moves it
    promo = reg.publish("cas", ref, {}, "run-c/c", "c", expected_production=1)
    assert promo.version == 2 and (reg.alias("cas"), reg.alias("cas", "previous")) == (2, 1)


def test_a_corrupted_blob_is_healed_by_the_next_writer(store):
    ref = store.put_blob(b"weights to heal" * 50, "model")
    key = ref.uri.split("/", 3)[3]
    for bad in (b"tampered weights" * 50, b"weights to heal"):  # same size; truncated
        store.s3.put_object(Bucket=store.bucket, Key=key, Body=bad)
        with pytest.raises(IntegrityError):
            store.get_blob(ref)
        assert store.put_blob(b"weights to heal" * 50, "model") == ref
        assert store.get_blob(ref) == b"weights to heal" * 50


def test_a_truncated_model_whose_sha_matches_is_named_in_the_error(store):
    from tasks.artifacts import serialize_model

    model, spec = _model()
    data = serialize_model(model, spec)
    ref = store.put_blob(data[: len(data) // 2], "model")  # its own sha: only parsing fails
    with pytest.raises(UnsafeArtifactError, match=f"{ref.uri}: "):
        store.get_model(ref)


def test_a_version_record_edited_outside_a_promotion_is_refused(store):
    """Someone who can write the bucket but holds no signing key re-points version.json at
    another object and carries its matching sha: the seal tells; a report edited after the
    seal is named by `verify`."""
    import json as _json

    reg = Registry(store)
    model, spec = _model()
    ref = reg.store.put_model(model, spec)
    promo = reg.publish("sealed", ref, {"report.md": "# measured\n"}, "run-s/c", "c")
    assert reg.verify("sealed", promo.version) is None
    info = reg.version_info("sealed", promo.version)
    assert set(info["files"]) == {"model.safetensors", "report.md"} and info["seal"]

    other = reg.store.put_model(build(spec, 7), spec)  # a real model, another sha
    key = f"registry/sealed/versions/{promo.version}/version.json"
    forged = {**info, "model": other.model_dump(), "files": {**info["files"],
                                                             "model.safetensors": other.sha256}}
    store.s3.put_object(Bucket=store.bucket, Key=key, Body=_json.dumps(forged).encode())
    with pytest.raises(IntegrityError, match="seal does not match"):
        reg.load("sealed", promo.version)
    assert "seal does not match" in reg.verify("sealed", promo.version)

    store.s3.put_object(Bucket=store.bucket, Key=key, Body=_json.dumps(info).encode())
    assert reg.verify("sealed", promo.version) is None  # the original record verifies again
    store.s3.put_object(Bucket=store.bucket, Key=f"registry/sealed/versions/{promo.version}/"
                        "report.md", Body=b"# edited\n")
    assert "report.md: sha256 does not match version.json" in reg.verify("sealed", promo.version)
