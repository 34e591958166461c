"""The built-in e-commerce click log: `generate(size, seed)` -> three splits and their spec.

The generator draws clicks from a hidden ground-truth model, so the Bayes-optimal AUC (the AUC of
the true click probability on the test split) is known and stored in the spec: the ceiling any
model can reach on this data.

Ground truth, per impression (user u, query q, item i shown at position k of a session):
    logit = -2.4 + 1.2*[cat(i) == intent(q)] + 0.9*tanh(<a_u, b_i>) + 0.6*affinity[seg(u), cat(i)]
            - 0.35*log(1+k) - 0.5*price_z(i)*price_sensitivity[seg(u)] + 0.4*quality(i)
            + 0.2*device_hour[device, hour] + 0.8*[cat(i) == cat(u's last clicked item)]
            + 1.0*[i among u's earlier clicks] + 1.0*[i == next(u's last clicked item)]
            + 0.8*[i among u's favourites]
Users and items follow Zipf popularity. What a session shows is drawn per impression: 35%
items of the query's category; 30% personal - half of it one of the user's 8 favourites (fixed
items of the two categories they like most), and for a returning user the rest one of their
last five clicks again (re-purchase, re-visit) or `next` of their last click (each item has one
fixed successor in its category: the accessory, the next volume); the rest by popularity. So the
user's id and history carry signal beyond popularity: the two-tower model's and the sequential
recommender's to learn (and to lose under compression).

Beside the user's `history` (item ids), each row carries `recent_categories`: the categories of
the same clicks, a multi-hot column (`multi_hot=_RECENT`: a model reads the last five). It
carries signal of its own: the `+0.8*[cat(i) == cat(u's last clicked item)]` term, which no
single-id column reveals (docs/benchmarks.md, "The multi-hot feature").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tasks.data import SPLIT_FRACTIONS, SPLITS
from tasks.metrics import auc
from tasks.types import CategoricalColumn, DatasetSpec


@dataclass(frozen=True)
class GeneratorSize:
    users: int
    items: int
    queries: int
    rows: int


SIZES = {
    "tiny": GeneratorSize(users=2_000, items=1_000, queries=300, rows=40_000),
    "small": GeneratorSize(users=100_000, items=50_000, queries=5_000, rows=1_000_000),
    # the rows of `small` over a few thousand ids per table: a model whose MLPs hold a large
    # share of the bytes (docs/search.md)
    "small_ids": GeneratorSize(users=4_000, items=3_000, queries=2_000, rows=1_000_000),
}
_CATEGORIES, _BRANDS, _SEGMENTS, _DEVICES, _HOURS = 40, 400, 6, 3, 24
_SESSION, _HISTORY = 10, 20  # results per search session; clicks kept in a history
_EXPOSURE = (0.35, 0.30)  # shares of impressions: the query's category, personal
_RECENT = 5  # a personal slot repeats one of the user's last _RECENT clicks
_FAVOURITES = 8  # items each user likes from the start (of their two favourite categories)


def _zipf(rng: np.random.Generator, n: int, size: int, a: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** a
    perm = rng.permutation(n)  # popularity unrelated to id order
    return perm[rng.choice(n, size=size, p=weights / weights.sum())]


def generate(size: str | GeneratorSize, seed: int = 0,
             ) -> tuple[dict[str, pa.Table], DatasetSpec]:
    """Generate the built-in click log: three time-ordered splits and their spec.

    Impressions come in search sessions (one user, one query, _SESSION results at positions
    1.._SESSION). Each row carries the user's history (their last _HISTORY clicked items
    before the session); the user's next click leans to the category of their last one, to
    items they clicked before and to their last click's successor, and the personal share of
    what a session shows comes from the same history, so the history is informative.
    """
    if isinstance(size, GeneratorSize):  # a size of one's own (docs/training_defaults.py)
        g, size = size, f"{size.rows // 1000}k"
    elif size not in SIZES:
        raise ValueError(f"dataset.builtin must be one of {sorted(SIZES)} (got {size!r})")
    else:
        g = SIZES[size]
    rng = np.random.default_rng(seed)
    k = 8
    # hidden world
    user_seg = rng.integers(0, _SEGMENTS, g.users)
    user_dev = rng.integers(0, _DEVICES, g.users)
    user_vec = rng.normal(0, 1, (g.users, k)) / np.sqrt(k) * 1.5
    item_cat = rng.integers(0, _CATEGORIES, g.items)
    item_brand = rng.integers(0, _BRANDS, g.items)
    cat_vec = rng.normal(0, 1, (_CATEGORIES, k))
    item_vec = (cat_vec[item_cat] + 0.7 * rng.normal(0, 1, (g.items, k))) / np.sqrt(k) * 1.5
    item_price_z = rng.normal(0, 1, g.items) + 0.3 * rng.normal(0, 1, _CATEGORIES)[item_cat]
    item_quality = rng.normal(0, 1, g.items)
    affinity = rng.normal(0, 1, (_SEGMENTS, _CATEGORIES))
    price_sens = rng.uniform(-0.2, 1.0, _SEGMENTS)
    device_hour = rng.normal(0, 1, (_DEVICES, _HOURS))
    query_intent = rng.integers(0, _CATEGORIES, g.queries)
    items_by_cat = [np.flatnonzero(item_cat == c) for c in range(_CATEGORIES)]

    # sessions, in time order; every impression of a session shares user, query and time
    sessions = g.rows // _SESSION
    n = sessions * _SESSION
    s_user = _zipf(rng, g.users, sessions, 1.0)
    s_query = _zipf(rng, g.queries, sessions, 1.1)
    s_hour = rng.integers(0, _HOURS, sessions)
    s_time = np.sort(rng.uniform(0, 30 * 86400, sessions)).astype(np.int64)  # 30 days
    session = np.repeat(np.arange(sessions), _SESSION)
    users, queries = s_user[session], s_query[session]
    items = _zipf(rng, g.items, n, 1.05)
    # what a session shows, per impression: 35% items of the query's category, 30% personal
    # (for a returning user: one of their last _RECENT clicks again, or the successor of the
    # last one - set in the loop below, it needs the history), the rest by popularity
    source = rng.random(n)
    match, personal = source < _EXPOSURE[0], source >= 1 - _EXPOSURE[1]
    intents = query_intent[queries]
    for c in range(_CATEGORIES):  # search results that match the query's intent
        rows = np.flatnonzero(match & (intents == c))
        if len(rows) and len(items_by_cat[c]):
            items[rows] = rng.choice(items_by_cat[c], size=len(rows))
    # each user's favourites: _FAVOURITES items of the two categories they like most, fixed
    liked = np.argsort(user_vec @ cat_vec.T, axis=1)[:, -2:]
    by_cat = np.argsort(item_cat, kind="stable")
    starts = np.searchsorted(item_cat[by_cat], np.arange(_CATEGORIES))
    counts = np.bincount(item_cat, minlength=_CATEGORIES)
    fav_cat = liked[np.arange(g.users)[:, None], rng.integers(0, 2, (g.users, _FAVOURITES))]
    favourites = by_cat[starts[fav_cat] + (rng.random(fav_cat.shape) * counts[fav_cat]).astype(
        np.int64)]
    # each item's successor: another item of its category (a fixed cycle through it)
    successor = np.arange(g.items)
    for members in items_by_cat:
        if len(members) > 1:
            cycle = rng.permutation(members)
            successor[cycle] = np.roll(cycle, -1)
    position = np.tile(np.arange(1, _SESSION + 1), sessions)
    hour = s_hour[session]
    seg, dev = user_seg[users], user_dev[users]

    def base_logit(rows: np.ndarray | slice, shown: np.ndarray) -> np.ndarray:
        return (-2.4
                + 1.2 * (item_cat[shown] == intents[rows])
                + 0.9 * np.tanh(np.einsum("nk,nk->n", user_vec[users[rows]], item_vec[shown]))
                + 0.6 * affinity[seg[rows], item_cat[shown]]
                - 0.35 * np.log1p(position[rows])
                - 0.5 * item_price_z[shown] * price_sens[seg[rows]]
                + 0.4 * item_quality[shown]
                + 0.2 * device_hour[dev[rows], hour[rows]])

    base = base_logit(slice(None), items)
    # sequential part: the user's last clicks; histories, built in time order
    uniform = rng.random(n)
    # a personal slot: a favourite (half), a recent click again or the last click's successor
    kind = rng.random(n)
    pick = rng.integers(0, max(_RECENT, _FAVOURITES), n)
    slots = np.flatnonzero(personal & (kind < 0.5))  # favourites need no history
    items[slots] = favourites[users[slots], pick[slots] % _FAVOURITES]
    base[slots] = base_logit(slots, items[slots])
    again = kind < 0.75
    p_true = np.empty(n)
    click = np.zeros(n, np.int8)
    history: dict[int, list[int]] = {}
    offsets = np.zeros(n + 1, np.int64)
    values: list[int] = []
    for s in range(sessions):
        lo, hi, u = s * _SESSION, (s + 1) * _SESSION, int(s_user[s])
        past = history.get(u, [])
        slots = lo + np.flatnonzero(personal[lo:hi] & (kind[lo:hi] >= 0.5))
        if past and len(slots):  # (without a history these stay popular items)
            recent = past[-_RECENT:]
            items[slots] = np.where(again[slots], np.asarray(recent)[pick[slots] % len(recent)],
                                    successor[past[-1]])
            base[slots] = base_logit(slots, items[slots])
        shown = items[lo:hi]
        logit = base[lo:hi] + 0.8 * np.isin(shown, favourites[u])
        if past:
            last = past[-1]
            logit = logit + (0.8 * (item_cat[shown] == item_cat[last]) + 1.0 * np.isin(shown, past)
                             + 1.0 * (shown == successor[last]))
        p = 1.0 / (1.0 + np.exp(-logit))
        p_true[lo:hi] = p
        clicked = uniform[lo:hi] < p
        click[lo:hi] = clicked
        for r in range(lo, hi):  # every impression of the session sees the same history
            values.extend(past)
            offsets[r + 1] = len(values)
        new = items[lo:hi][clicked].tolist()
        if new:
            history[u] = (past + new)[-_HISTORY:]

    price = np.exp(3.0 + 0.8 * item_price_z[items])
    impressions = np.bincount(items, minlength=g.items)
    item_pop = impressions[items]
    # head items: the most shown ones that together make half of all impressions
    ranked = np.argsort(-impressions, kind="stable")
    head = np.zeros(g.items, bool)
    head[ranked[:int(np.searchsorted(np.cumsum(impressions[ranked]), n / 2)) + 1]] = True
    history_len = np.diff(offsets)
    columns = {
        "user_id": users, "item_id": items, "category_id": item_cat[items],
        "brand_id": item_brand[items], "query_id": queries, "user_segment": seg,
        "device": dev, "hour": hour,
        "log_price": np.log(price).astype(np.float32),
        "position": position.astype(np.float32),
        "log_item_popularity": np.log1p(item_pop).astype(np.float32),
        "session_id": session.astype(np.int64), "timestamp": s_time[session],
        "item_popularity": np.where(head[items], "head", "tail"),
        "user_type": np.where(history_len == 0, "new", "returning"),
        "click": click,
    }
    cards = {"user_id": g.users, "item_id": g.items, "category_id": _CATEGORIES,
             "brand_id": _BRANDS, "query_id": g.queries, "user_segment": _SEGMENTS,
             "device": _DEVICES, "hour": _HOURS}
    # split on session boundaries, by time
    cut = [0, *(int(f * sessions) * _SESSION for f in np.cumsum(SPLIT_FRACTIONS[:-1])), n]
    hist = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(np.asarray(values, np.int64), pa.int64()))
    recent = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                      pa.array(item_cat[np.asarray(values, np.int64)], pa.int64()))
    tables = {}
    for i, split in enumerate(SPLITS):
        lo, hi = cut[i], cut[i + 1]
        cols = {name: col[lo:hi] for name, col in columns.items()}
        cols["history"] = hist[lo:hi]
        cols["recent_categories"] = recent[lo:hi]
        tables[split] = pa.table(cols)
    test = slice(cut[2], cut[3])
    spec = DatasetSpec(
        name=f"clicklog-{size}-s{seed}", label="click",
        categorical=(*(CategoricalColumn(name=c, cardinality=v) for c, v in cards.items()),
                     CategoricalColumn(name="recent_categories", cardinality=_CATEGORIES,
                                       multi_hot=_RECENT)),
        dense=("log_price", "position", "log_item_popularity"),
        user_id="user_id", item_id="item_id", query_id="session_id", timestamp="timestamp",
        history="history", item_features=("category_id", "brand_id"),
        segments=("item_popularity", "user_type"),
        bayes_auc=auc(click[test], p_true[test]),
    )
    return tables, spec
