import torch

from tasks.data import generate, to_arrays
from tasks.evaluate import predict
from tasks.metrics import auc
from tasks.models import build, resolve
from tasks.train import train
from tasks.types import ModelSpec, TrainConfig

SPEC = ModelSpec(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16,))


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


def test_early_stopping_keeps_the_best_validation_epoch():
    spec, tr, va, te = _data()
    from tasks.metrics import logloss

    one = train(build(resolve(SPEC, spec)), tr, TrainConfig(epochs=1, lr=0.05))
    many = train(build(resolve(SPEC, spec)), tr, TrainConfig(epochs=6, lr=0.05), valid=va)
    # with a high learning rate, epoch 1 is the best on valid: more epochs must not be worse
    assert logloss(va.label, predict(many, va)) <= logloss(va.label, predict(one, va)) + 1e-9
