import numpy as np

from tasks.data import SPLITS, to_arrays
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.types import DlrmSpec


def test_generator_is_deterministic_and_time_ordered():
    a, spec_a = generate("tiny", 7)
    b, spec_b = generate("tiny", 7)
    assert spec_a == spec_b and all(a[s].equals(b[s]) for s in SPLITS)
    ts = [a[s]["timestamp"].to_numpy() for s in SPLITS]
    assert ts[0].max() <= ts[1].min() and ts[1].max() <= ts[2].min()


def test_ids_within_cardinality_and_bayes_auc_plausible():
    tables, spec = generate("tiny", 0)
    for col in spec.categorical:
        values = np.concatenate([
            (tables[s][col.name].combine_chunks().flatten() if col.multi_hot else
             tables[s][col.name]).to_numpy() for s in SPLITS])
        assert values.min() >= 0 and values.max() < col.cardinality
    assert 0.7 < spec.bayes_auc < 0.9
    ctr = tables["train"]["click"].to_numpy().mean()
    assert 0.05 < ctr < 0.3


def test_recent_categories_are_the_historys_categories_and_carry_signal_of_their_own():
    """`recent_categories` lists the category of each item of `history`, in the same order;
    a shown item of the last click's category is clicked more often than one of another
    category that the user also clicked before (the ground truth's last-category term)."""
    tables, spec = generate("tiny", 0)
    train = tables["train"]
    category = dict(zip(train["item_id"].to_numpy(), train["category_id"].to_numpy()))
    last_cat, earlier_cat, shown_cat = [], [], train["category_id"].to_numpy()
    for hist, cats in zip(train["history"].to_pylist(), train["recent_categories"].to_pylist()):
        assert len(hist) == len(cats)
        assert all(category.get(i, c) == c for i, c in zip(hist, cats))
        last_cat.append(cats[-1] if cats else -1)
        earlier_cat.append(set(cats[:-1]))
    click = train["click"].to_numpy()
    last = shown_cat == np.asarray(last_cat)
    earlier = np.array([c in e for c, e in zip(shown_cat, earlier_cat)]) & ~last
    assert last.sum() > 500 and earlier.sum() > 500
    assert click[last].mean() > click[earlier].mean() + 0.03


def test_model_runs_on_generated_batch():
    tables, spec = generate("tiny", 0)
    arrays = to_arrays(tables["valid"].slice(0, 16), spec)
    import torch

    model = build(resolve(DlrmSpec(embedding_dim=8, bottom_mlp=(8,), top_mlp=(8,)), spec))
    out = model(torch.from_numpy(arrays.dense), torch.from_numpy(arrays.sparse))
    assert out.shape == (16,)


def test_the_history_carries_signal_beyond_popularity():
    """A returning user's click is often one of their own earlier clicks (the personal share
    of what sessions show and the ground truth's repeat term): far more often than the
    popularity of those items alone would make it."""
    tables, spec = generate("tiny", 0)
    train = tables["train"]
    clicked = np.flatnonzero(train["click"].to_numpy() == 1)
    history, items = train["history"].to_pylist(), train["item_id"].to_numpy()
    returning = [r for r in clicked if history[r]]
    repeat = np.mean([items[r] in history[r] for r in returning])
    share = np.bincount(items[clicked], minlength=1000) / len(clicked)  # click popularity
    by_chance = np.mean([share[np.unique(history[r])].sum() for r in returning])
    assert repeat > 0.25 and repeat > 2 * by_chance, (repeat, by_chance)
