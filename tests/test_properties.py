"""Properties of the metrics, the table aggregation and the record store, on random labelings and records."""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench import store
from bench import table as tbl
from bench.metrics import ari, cluster_acc, contingency, evaluate, nmi

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a pandas frame each
SLOWER = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # four renderings each


# --------------------------------------------------------------------------------------------------------------
# metrics


@st.composite
def labelings(draw, max_n: int = 40, max_k: int = 5):
    n = draw(st.integers(1, max_n))
    kt = draw(st.integers(1, max_k))
    kp = draw(st.integers(1, max_k))
    y_true = draw(st.lists(st.integers(0, kt - 1), min_size=n, max_size=n))
    y_pred = draw(st.lists(st.integers(0, kp - 1), min_size=n, max_size=n))
    return np.array(y_true), np.array(y_pred)


@SETTINGS
@given(labelings())
def test_metrics_are_bounded_and_symmetric(pair):
    t, p = pair
    m = evaluate(t, p)
    assert 0.0 <= m["acc"] <= 1.0
    assert -1e-12 <= m["nmi"] <= 1.0 + 1e-12
    assert -1.0 - 1e-12 <= m["ari"] <= 1.0 + 1e-12
    assert cluster_acc(p, t) == pytest.approx(m["acc"], abs=1e-12)
    assert nmi(p, t) == pytest.approx(m["nmi"], abs=1e-12)
    assert ari(p, t) == pytest.approx(m["ari"], abs=1e-12)


@SETTINGS
@given(labelings(), st.randoms(use_true_random=False), st.integers(-1000, 1000))
def test_renaming_the_clusters_changes_nothing(pair, rnd, offset):
    t, p = pair
    ids = np.unique(p)
    new = rnd.sample(range(10_000), len(ids))
    renamed = np.array([new[int(np.searchsorted(ids, v))] + offset for v in p])
    a, b = evaluate(t, p), evaluate(t, renamed)
    assert b["acc"] == a["acc"]
    assert b["nmi"] == pytest.approx(a["nmi"], abs=1e-12)
    assert b["ari"] == pytest.approx(a["ari"], abs=1e-12)


@SETTINGS
@given(labelings(max_n=12, max_k=4))
def test_acc_is_the_best_one_to_one_map(pair):
    t, p = pair
    classes, clusters = sorted(set(t.tolist())), sorted(set(p.tolist()))
    best = 0
    for image in itertools.permutations(classes + [None] * len(clusters), len(clusters)):
        mapping = dict(zip(clusters, image))
        best = max(best, sum(mapping[c] == y for c, y in zip(p.tolist(), t.tolist())))
    assert cluster_acc(t, p) == pytest.approx(best / len(t), abs=1e-12)
    assert cluster_acc(t, p) >= contingency(t, p).max() / len(t)


@SETTINGS
@given(labelings())
def test_a_perfect_labeling_scores_one(pair):
    t, _ = pair
    shuffled = (t * 7 + 3) % 1_000_003  # a renaming of the classes
    m = evaluate(t, shuffled)
    assert m["acc"] == 1.0 and m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)


@SETTINGS
@given(labelings(), st.lists(st.booleans(), min_size=40, max_size=40))
def test_unlabelled_samples_are_left_out(pair, hide):
    t, p = pair
    mask = np.array(hide[: len(t)])
    assume(not mask.all())
    hidden = np.where(mask, -1, t)
    assert evaluate(hidden, p) == evaluate(t[~mask], p[~mask])


@SETTINGS
@given(labelings())
def test_contingency_counts_every_sample_once(pair):
    t, p = pair
    m = contingency(t, p)
    assert m.sum() == len(t) and (m >= 0).all()
    assert sorted(m.sum(axis=1).tolist()) == sorted(np.unique(t, return_counts=True)[1].tolist())
    assert sorted(m.sum(axis=0).tolist()) == sorted(np.unique(p, return_counts=True)[1].tolist())


# --------------------------------------------------------------------------------------------------------------
# the table

STATUSES = ("completed", "failed", "diverged", "running", "pending")
# values on a 1/1024 grid: sums are exact, so a mean does not depend on the order of the runs
grid_value = st.integers(0, 1024).map(lambda i: i / 1024)
metrics_dict = st.fixed_dictionaries({m: grid_value for m in tbl.METRICS})
record = st.fixed_dictionaries({
    "method": st.sampled_from(["kmeans", "byol", "conr", "a_b%"]),
    "dataset": st.sampled_from(["digits", "cifar10", "my&set"]),
    "seed": st.integers(0, 5),
    "tag": st.sampled_from(["", "", "v2"]),
    "status": st.sampled_from(STATUSES),
    "metrics": st.one_of(st.none(), metrics_dict),
    "config_hash": st.sampled_from(["h1", "h2"]),
    "protocol": st.just({"name": "transductive", "train": ["train", "test"], "eval": ["train", "test"]}),
})


def _cells(table: tbl.Table) -> dict:
    return {(r.key, d, m): c for r in table.rows for (d, m), c in r.cells.items()}


def _same_cell(a: tbl.Cell, b: tbl.Cell) -> bool:
    def close(x, y):
        return (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9)

    return a.n == b.n and a.text == b.text and a.state == b.state and close(a.mean, b.mean) and close(a.std, b.std)


@SLOW
@given(st.lists(record, max_size=30), st.randoms(use_true_random=False))
def test_the_table_does_not_depend_on_the_order_of_the_records(records, rnd):
    shuffled = list(records)
    rnd.shuffle(shuffled)
    a, b = tbl.build_table(records), tbl.build_table(shuffled)
    assert [r.key for r in a.rows] == [r.key for r in b.rows] and a.datasets == b.datasets
    ca, cb = _cells(a), _cells(b)
    assert ca.keys() == cb.keys()
    assert all(_same_cell(ca[k], cb[k]) for k in ca)
    assert [(r.key, r.runs) for r in a.rows] == [(r.key, r.runs) for r in b.rows]


@SLOW
@given(st.lists(record, max_size=30))
def test_cells_are_the_mean_of_the_completed_runs_and_ranks_mark_the_best(records):
    t = tbl.build_table(records)
    for r in t.rows:
        name, _, rest = r.key.partition(" (")
        tag = rest[:-1] if rest else ""
        for (d, m), c in r.cells.items():
            done = [100 * x["metrics"][m] for x in records
                    if x["method"] == name and x["tag"] == tag and x["dataset"] == d and x["status"] == "completed"
                    and x["metrics"] is not None]
            assert c.n == len(done)
            if done:
                assert c.mean == pytest.approx(float(np.mean(done)), abs=1e-9)
                if len(done) > 1:
                    assert c.std == pytest.approx(float(np.std(done, ddof=1)), abs=1e-9)
            else:
                assert not c.has_value
    for d in t.datasets:
        for m in tbl.METRICS:
            valued = [r.cells[(d, m)] for r in t.rows if r.cells[(d, m)].has_value]
            distinct = sorted({round(c.mean, 1) for c in valued}, reverse=True)
            for c in valued:
                if len(valued) < 2:
                    assert c.rank == 0
                elif round(c.mean, 1) == distinct[0]:
                    assert c.rank == 1
                elif len(distinct) > 1 and round(c.mean, 1) == distinct[1]:
                    assert c.rank == 2
                else:
                    assert c.rank == 0


@SLOW
@given(st.lists(record, min_size=1, max_size=20), st.lists(record, min_size=1, max_size=10))
def test_runs_that_did_not_complete_never_change_a_number(records, others):
    unfinished = [{**r, "status": s, "metrics": {m: 0.999 for m in tbl.METRICS}}
                  for r, s in zip(others, itertools.cycle(["failed", "diverged", "running", "pending"]))]
    keys = {(r["method"], r["tag"], r["dataset"]) for r in records}
    unfinished = [r for r in unfinished if (r["method"], r["tag"], r["dataset"]) in keys]
    a, b = _cells(tbl.build_table(records)), _cells(tbl.build_table(records + unfinished))
    for k, c in a.items():
        if c.has_value:
            assert b[k].has_value and b[k].n == c.n
            assert b[k].mean == pytest.approx(c.mean, abs=1e-9)
    agg = tbl.aggregate(tbl.run_frame(records + unfinished))
    assert int(agg["runs"].sum()) == len(records) + len(unfinished)


@SLOWER
@given(st.lists(record, max_size=12))
def test_every_format_renders_every_row(records):
    t = tbl.build_table(records)
    for fmt in tbl.FORMATS:
        text = tbl.render(t, fmt)
        assert isinstance(text, str) and text
    md = tbl.to_markdown(t)
    assert len([ln for ln in md.splitlines() if ln.startswith("|")]) == len(t.rows) + 2


# --------------------------------------------------------------------------------------------------------------
# the record store

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
store_record = st.fixed_dictionaries(
    {"method": st.sampled_from(["kmeans", "byol"]), "dataset": st.sampled_from(["digits", "cifar10"]),
     "seed": st.integers(0, 3), "status": st.sampled_from(STATUSES)},
    optional={"extra": json_value, "history": st.lists(st.dictionaries(st.text(max_size=6), json_leaf), max_size=5)})


@SLOW
@given(st.lists(store_record, max_size=8), st.lists(st.binary(max_size=64), max_size=4))
def test_records_round_trip_and_damaged_ones_are_reported_not_dropped(records, garbage):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        written = {}
        for i, rec in enumerate(records):
            folder = store.run_dir(root, rec["method"], rec["dataset"], store.run_id(rec["seed"], f"h{i}"))
            store.write_record(folder, rec)
            written[str(folder / "record.json")] = rec
        bad = []
        for j, blob in enumerate(garbage):
            folder = store.run_dir(root, "byol", "digits", f"broken{j}")
            folder.mkdir(parents=True)
            text = blob.decode("latin-1")
            try:
                if isinstance(json.loads(text), dict):
                    text = "{" + text  # make sure it is not a valid record
            except ValueError:
                pass
            (folder / "record.json").write_text(text, encoding="latin-1")
            bad.append(str(folder / "record.json"))
        problems: list[str] = []
        loaded = store.load_records(root, problems=problems)
        assert len(loaded) + len(problems) == len(written) + len(bad)
        assert {r["_path"]: {k: v for k, v in r.items() if k != "_path"} for r in loaded} == written
        assert all(any(p in msg for msg in problems) for p in bad)
        assert not list(root.rglob("*.tmp"))

