import numpy as np
import pytest
import torch

from tasks.data import Arrays, to_arrays
from tasks.evaluate import predict
from tasks.generator import generate
from tasks.metrics import auc
from tasks.models import build, resolve
from tasks.train import train
from tasks.types import DlrmSpec, TrainConfig

SPEC = DlrmSpec(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16,))


def _data():
    tables, spec = generate("tiny", 0)
    return spec, *(to_arrays(tables[s], spec) for s in ("train", "valid", "test"))


def test_training_learns_and_is_deterministic():
    spec, tr, va, te = _data()
    a = train(build(resolve(SPEC, spec)), tr, TrainConfig(epochs=2, batch_size=256, seed=1), valid=va)
    b = train(build(resolve(SPEC, spec)), tr, TrainConfig(epochs=2, batch_size=256, seed=1), valid=va)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert auc(te.label, predict(a, te)) > 0.6  # Bayes AUC of tiny is ~0.78; chance is 0.5


def test_embedding_l2_holds_back_the_rows_a_batch_uses_and_leaves_no_hook():
    """The lookup penalty shrinks the vectors of the ids the train rows use (a multi-hot bag's
    too), leaves ids no row uses at their initial values, and is gone after training."""
    spec, tr, va, _ = _data()
    cfg = TrainConfig(epochs=1, batch_size=256)
    plain = train(build(resolve(SPEC, spec)), tr, cfg)
    held = train(build(resolve(SPEC, spec)), tr, cfg.model_copy(update={"embedding_l2": 0.1}))
    start = build(resolve(SPEC, spec))
    users = np.unique(tr.sparse[:, 0])
    unused = np.setdiff1d(np.arange(plain.embeddings[0].num_embeddings), users)
    assert len(unused) > 0
    rows = {0: users, len(plain.embeddings) - 1: slice(None)}  # user_id; the bag: all used
    for i, used in rows.items():
        shrunk = held.embeddings[i].weight[used].norm() / plain.embeddings[i].weight[used].norm()
        assert shrunk < 0.8, (i, shrunk)
    assert torch.equal(held.embeddings[0].weight[unused], start.embeddings[0].weight[unused])
    assert all(not m._forward_hooks for m in held.modules())
    assert np.isfinite(predict(held, va)).all()


def test_early_stopping_keeps_the_best_validation_epoch():
    spec, tr, va, te = _data()
    from tasks.metrics import logloss

    one = train(build(resolve(SPEC, spec)), tr, TrainConfig(epochs=1, lr=0.05))
    many = train(build(resolve(SPEC, spec)), tr, TrainConfig(epochs=6, lr=0.05), valid=va)
    # with a high learning rate, epoch 1 is the best on valid: more epochs must not be worse
    assert logloss(va.label, predict(many, va)) <= logloss(va.label, predict(one, va)) + 1e-9


def test_patience_trains_past_a_worse_epoch_and_restores_the_best(monkeypatch):
    """Valid losses 1.0, 1.1, 0.9, 1.0, 1.2, ...: with patience 2 training goes on after the
    worse second epoch, stops after the fifth (two in a row no better than the third) and
    returns the third epoch's weights."""
    from tasks import objectives

    spec, tr, va, _ = _data()
    losses = iter([1.0, 1.1, 0.9, 1.0, 1.2, 0.1, 0.1])
    snapshots = []
    real = objectives.valid_loss

    def scripted(model, *args, **kw):
        real(model, *args, **kw)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(losses)

    monkeypatch.setattr(objectives, "valid_loss", scripted)
    model = train(build(resolve(SPEC, spec)), tr.take(slice(0, 2000)),
                  TrainConfig(epochs=10, patience=2, batch_size=512), valid=va)
    assert len(snapshots) == 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k]), k
    assert not all(torch.equal(v, snapshots[4][k]) for k, v in model.state_dict().items())


class _Scripted(torch.nn.Module):
    """A model whose every call advances a scripted clock by `scale` times a draw shared with
    the machine: lognormal jitter, plus bursts (another process taking the core) that slow
    every call made while they last, whichever model runs then."""

    def __init__(self, machine, scale):
        super().__init__()
        self.machine, self.scale = machine, scale

    def forward(self, dense, sparse):
        self.machine.call(self.scale)
        return dense[:, 0]


class _Machine:
    def __init__(self, seed, burst_p=0.01, burst_calls=15, burst_cost=4.0):
        self.rng, self.now, self.left = np.random.default_rng(seed), 0.0, 0
        self.burst_p, self.burst_calls, self.burst_cost = burst_p, burst_calls, burst_cost

    def call(self, scale):
        if self.left == 0 and self.rng.random() < self.burst_p:
            self.left = self.burst_calls
        slow = 1.0 + (self.burst_cost if self.left else 0.0)
        self.left = max(self.left - 1, 0)
        self.now += 1e-3 * scale * slow * self.rng.lognormal(0.0, 0.1)

    def clock(self):
        return self.now


def _scripted_ratios(seed, scales, burst_p=0.01, **kw):
    from tasks.evaluate import latency_ratios

    n = 64
    data = Arrays(dense=np.zeros((n, 2), np.float32), sparse=np.zeros((n, 1), np.int64),
                  label=np.zeros(n, np.float32))
    machine = _Machine(seed, burst_p)
    reference, *models = (_Scripted(machine, s) for s in scales)
    return latency_ratios(reference, models, data, batch_sizes=(8,), clock=machine.clock, **kw)


def test_latency_ratio_intervals_cover_the_truth_under_bursts_of_load():
    """On a scripted clock with bursts of foreign load, interleaved rounds give identical
    copies an interval around 1 (in most of 20 runs x 3 copies: a 95% interval), and a
    model twice as fast an interval around 2 that excludes 1 every time."""
    covered = 0
    for seed in range(20):
        _, _, ratios = _scripted_ratios(seed, (1.0, 1.0, 1.0, 1.0))  # the flow's defaults
        covered += sum(r[0].ci_low <= 1.0 <= r[0].ci_high for r in ratios)
        assert all(r[0].ci_low <= r[0].value <= r[0].ci_high and r[0].rounds >= 10
                   for r in ratios)
    assert covered >= 52, covered  # 54 of 60 measured (bursts cost a 95% interval some cover)
    for seed in range(5):
        base, lats, (fast, same) = _scripted_ratios(seed, (1.0, 0.5, 1.0), iters=10,
                                                    min_rounds=8, max_rounds=40)
        assert 1.0 < fast[0].ci_low <= 2.0 <= fast[0].ci_high, fast
        assert base[0].batch_size == 8 and lats[0][0].p99_ms < base[0].p99_ms


def test_latency_stops_when_every_interval_is_narrow_or_the_rounds_run_out():
    _, _, quiet = _scripted_ratios(0, (1.0, 1.0), burst_p=0.0, iters=10, min_rounds=8,
                                   max_rounds=200, width=0.2)
    assert quiet[0][0].rounds == 8  # narrow after the first 8 rounds
    _, _, capped = _scripted_ratios(0, (1.0, 1.0), iters=10, min_rounds=8, max_rounds=24,
                                    width=1e-6)
    assert capped[0][0].rounds == 24
    _, _, timed_out = _scripted_ratios(0, (1.0, 1.0), iters=10, min_rounds=8, max_rounds=10**6,
                                       width=1e-6, max_seconds=1.0)
    # 2 models x 10 calls x ~1 ms per round (+ bursts): over a scripted second after <= 56 rounds
    assert 8 <= timed_out[0][0].rounds <= 56


def test_real_models_are_timed_side_by_side_with_the_reference():
    """Structure only (wall-clock ratios are the benchmarks' business, never a test's)."""
    import copy

    from tasks.evaluate import latency_ratios

    spec, tr, va, te = _data()
    model = train(build(resolve(SPEC, spec)), tr.take(slice(0, 2000)),
                  TrainConfig(epochs=1, batch_size=512))
    reference, *copies = (copy.deepcopy(model) for _ in range(3))
    base, lats, ratios = latency_ratios(reference, copies, te, batch_sizes=(64, 512), iters=5,
                                        min_rounds=4, max_rounds=4)
    assert [b.batch_size for b in base] == [64, 512] and torch.get_num_threads() >= 1
    for lat, ratio in zip(lats, ratios):
        assert [r.rounds for r in ratio] == [4, 4] and all(x.p99_ms > 0 for x in lat)
        assert all(r.ci_low <= r.value <= r.ci_high for r in ratio)
    # every figure names what it was timed on: here one CPU thread of this machine's CPU
    from tasks.evaluate import cpu_model

    named = {x.device for x in (*base, *lats[0], *ratios[0])}
    assert named == {f"cpu: 1 thread of {cpu_model()}"}, named


def test_timing_on_a_gpu_that_is_not_there_is_refused_by_name():
    from tasks.timing import serving_device

    with pytest.raises(ValueError, match=r"resources.serving_device is 'cuda' but the timing "
                                         r"task got no GPU"):
        serving_device("cuda")
    assert serving_device("cpu").type == "cpu"
    assert serving_device("auto").type == "cpu"  # no Ray GPU here: CPU, never assumed CUDA
