"""Paired comparisons (reports/significance.py) against direct computations on planted data, and
per-item results end to end: records keep them, `--log-samples` writes lm-eval's per-sample
files, and `report --baseline` pairs methods on the same items."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from reports import significance as sig


def direct_mcnemar(base, other) -> float:
    """Two-sided exact McNemar by hand: binomial(n = discordant, 1/2) tail, doubled, capped at 1."""
    b = sum(1 for x, y in zip(base, other) if x == 1 and y == 0)
    c = sum(1 for x, y in zip(base, other) if x == 0 and y == 1)
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def direct_bootstrap(ds, n=40_000, seed=1) -> tuple[float, float]:
    """Percentile bootstrap of the mean over tasks of each task's mean difference, by plain numpy."""
    rng = np.random.default_rng(seed)
    means = np.mean([d[rng.integers(0, len(d), (n, len(d)))].mean(axis=1) for d in ds], axis=0)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@pytest.fixture
def planted():
    rng = np.random.default_rng(7)
    base = (rng.random(300) < 0.55).astype(float)
    other = base.copy()
    flip = rng.choice(300, 40, replace=False)  # 30 gained, 10 lost: a real improvement
    other[flip[:30]] = 1.0
    other[flip[30:]] = 0.0
    return base, other


def test_mcnemar_and_bootstrap_match_direct_computation(planted):
    base, other = planted
    p = sig.compare(base, other)
    assert p.n == 300 and p.diff == pytest.approx(float((other - base).mean()))
    assert p.p_mcnemar == pytest.approx(direct_mcnemar(base, other), rel=1e-9)
    low, high = direct_bootstrap([other - base])
    assert abs(p.low - low) < 0.006 and abs(p.high - high) < 0.006  # Monte Carlo error of the two estimates
    assert p.significant == (p.p_mcnemar < 0.05)


def test_accuracies_are_significant_by_the_exact_test_not_a_lenient_bootstrap():
    base = np.zeros(100)
    other = base.copy()
    other[:7] = 1.0  # 7 gained
    base[99] = 1.0  # 1 lost
    p = sig.compare(base, other)
    assert p.low > 0 and p.p_mcnemar == pytest.approx(direct_mcnemar(base, other)) and 0.05 < p.p_mcnemar < 0.1
    assert not p.significant
    other[7:10] = 1.0  # 10 gained, 1 lost: p = 0.012
    assert sig.compare(base, other).significant
    cont = sig.compare(np.linspace(0, 1, 50), np.linspace(0, 1, 50) + 0.05 + 0.01 * np.sin(np.arange(50)))
    assert cont.p_mcnemar is None and cont.low > 0 and cont.significant  # non-binary: the CI decides


def test_average_bootstrap_resamples_each_task(planted):
    base, other = planted
    rng = np.random.default_rng(3)
    b2 = (rng.random(120) < 0.5).astype(float)
    o2 = b2.copy()
    o2[:6] = 1 - o2[:6]
    avg = sig.compare_average([(base, other), (b2, o2)])
    assert avg.diff == pytest.approx(((other - base).mean() + (o2 - b2).mean()) / 2)
    low, high = direct_bootstrap([other - base, o2 - b2])
    assert abs(avg.low - low) < 0.006 and abs(avg.high - high) < 0.006


def test_identical_results_are_the_same_not_significant():
    x = np.array([0, 1, 1, 0, 1], float)
    p = sig.compare(x, x)
    assert (p.diff, p.low, p.high, p.p_mcnemar, p.significant) == (0.0, 0.0, 0.0, 1.0, False)


def test_non_binary_metrics_get_no_mcnemar():
    p = sig.compare(np.array([0.2, 0.4, 0.9]), np.array([0.3, 0.4, 1.0]))
    assert p.p_mcnemar is None and p.diff == pytest.approx(0.2 / 3)


def test_log_samples_records_items_and_the_paired_report(tmp_path, data_dir, cli):
    out = tmp_path / "run"
    r = cli("--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned,tail", "--set", "tail.k=2",
                "--tasks", "arc_easy,boolq", "--limit", "8", "--mode", "disaggregated", "--out", out, "--log-samples",
                data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    for method in ("unpruned", "tail"):
        rec = json.loads((out / f"{method}__disaggregated.json").read_text())
        for task in ("arc_easy", "boolq"):
            df = pd.read_json(out / "samples" / f"{method}__disaggregated" / f"samples_{task}.jsonl", lines=True)
            assert len(df) == 8 and {"doc_id", "target", "resps", "filtered_resps", "acc"} <= set(df.columns)
            assert df["acc"].mean() == pytest.approx(rec["scores"][task]["acc"]["value"])  # items average to the score
            items = rec["extra"]["items"][task]
            assert items["ids"] == [f"{task}/{i}" for i in sorted(df["doc_id"])]
            assert items["metrics"]["acc"] == [float(x) for x in df.sort_values("doc_id")["acc"]]
    rep = tmp_path / "rep"
    r = cli("report", out, "--out", rep, "--no-plots", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (rep / "tables" / "paired.md").read_text()
    assert "| tail |" in table and "better /" in table and "McNemar" in table
    csv = pd.read_csv(rep / "tables" / "paired.csv")
    assert len(csv) == 1


def test_without_log_samples_no_sample_files(tmp_path, data_dir, cli):
    out = tmp_path / "run"
    r = cli("--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned", "--tasks", "arc_easy",
                "--limit", "3", "--mode", "unified", "--out", out, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "samples").exists()
    assert len(json.loads((out / "unpruned__unified.json").read_text())["extra"]["items"]["arc_easy"]["ids"]) == 3


def test_per_item_values_leave_out_metrics_whose_aggregate_is_not_a_mean():
    """LAMBADA logs `perplexity` per item as a bare loglikelihood: a mean of those is not its perplexity."""
    from harness.quality.samples import per_item

    samples = {"lambada_openai": [{"doc_id": i, "metrics": ["perplexity", "acc"], "perplexity": -3.0 - i, "acc": i % 2}
                                  for i in range(3)],
               "wikitext": [{"doc_id": 0, "metrics": ["word_perplexity"], "word_perplexity": (-10.0, 4)}]}
    items = per_item(samples)
    assert items["metrics"] == {"acc": [0.0, 1.0, 0.0, None]}
    assert items["ids"] == ["lambada_openai/0", "lambada_openai/1", "lambada_openai/2", "wikitext/0"]


def test_pd_ppl_keeps_per_article_perplexities_and_pairs_them(tmp_path, data_dir, cli):
    from harness.store.records import load_dir
    from reports.collect import collect
    from reports.formats import rows
    from reports.tables import TASK_TITLE

    r = cli("--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned,tail", "--set", "tail.k=1", "--tasks",
            "pd_ppl", "--set", "pd_ppl.docs=3", "--set", "pd_ppl.prompt_tokens=32,64", "--set", "pd_ppl.cont_tokens=8",
            "--out", tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = {x.method: x for x in load_dir(tmp_path)}
    for rec in recs.values():
        items = rec.extra["items"]["pd_ppl"]
        assert items["ids"] == ["pd_ppl/0", "pd_ppl/1", "pd_ppl/2"]
        pooled = math.exp(np.mean(np.log(items["metrics"]["ppl"])))  # exp(mean over articles of their mean NLL)
        assert pooled == pytest.approx(rec.scores["pd_ppl"]["ppl"]["value"], rel=1e-9)
    table = sig.paired_table(collect([tmp_path]))
    # the caption says which difference this is: by Jensen, not that of the long-context table's pooled perplexities
    assert "the mean over articles of each article's perplexity difference, not the difference of the long-context " \
           "table's perplexities" in table.attrs["caption"]
    t = rows(table).set_index("Method")
    cell = t.loc["tail", TASK_TITLE.get("pd_ppl", "pd_ppl")]
    diff = np.mean(np.subtract(recs["tail"].extra["items"]["pd_ppl"]["metrics"]["ppl"],
                               recs["unpruned"].extra["items"]["pd_ppl"]["metrics"]["ppl"]))
    assert cell.startswith(f"{diff:+.1f}"), cell  # in perplexity, not ×100 points


def test_the_caption_counts_the_p_values_it_adjusts_apart_from_the_ci_judged_tests(tmp_path, data_dir, cli):
    """A perplexity is starred by its CI and has no p-value: the caption counted it among the tests whose p-values the
    CSV's `_p_bh` adjusts 'together', while BH ran over the 2 p-values only (ARC-e's and the Avg's)."""
    import io

    from reports.collect import collect
    from reports.formats import to_csv

    r = cli("--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned,tail", "--set", "tail.k=1", "--tasks",
            "arc_easy,pd_ppl", "--limit", "6", "--set", "pd_ppl.docs=3", "--set", "pd_ppl.prompt_tokens=32,64", "--set",
            "pd_ppl.cont_tokens=8", "--mode", "disaggregated", "--out", tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    table = sig.paired_table(collect([tmp_path]))
    csv = pd.read_csv(io.StringIO(to_csv(table)))
    assert sum(csv[c].notna().sum() for c in csv.columns if c.endswith("_p_bh")) == 2
    assert "this table makes 3 tests at 0.05" in table.attrs["caption"]
    assert "the CSV's <column>_p_bh columns hold the 2 p-values among them adjusted together (Benjamini-Hochberg, the " \
           "false discovery rate over those 2); the 1 judged by their CI have no p-value and are not adjusted." \
           in table.attrs["caption"], table.attrs["caption"]


def test_a_single_item_or_an_infinite_value_has_no_ci_and_is_never_significant():
    one = sig.compare(np.array([10.0]), np.array([15.2]))  # one pd_ppl article: no spread to resample
    assert one.diff == pytest.approx(5.2) and math.isnan(one.low) and math.isnan(one.high) and not one.significant
    inf = sig.compare(np.array([10.0, 11.0, 12.0]), np.array([12.0, np.inf, 13.0]))
    assert inf.diff == np.inf and math.isnan(inf.low) and not inf.significant
    # a task of one item beside tasks of several: the average's CI is unknown, and nothing raises (scipy would)
    avg = sig.compare_average([(np.array([0.0]), np.array([1.0])), (np.array([0.0, 1.0, 1.0, 0.0]), np.array([1.0, 1.0, 0.0, 1.0]))])
    assert avg.diff == pytest.approx((1.0 + 0.25) / 2) and math.isnan(avg.low) and not avg.significant and avg.n == 5
    cell = sig._text(one, lower=True)
    assert cell[0] == "+5.2 [—]" and cell[2] is None  # no CI columns in the CSV
    # two items that moved alike: the CI is the difference itself, as the bootstrap would give
    same = sig.compare(np.array([10.0, 12.0]), np.array([11.0, 13.0]))
    assert (same.low, same.high) == (1.0, 1.0) and same.significant


def test_a_nan_item_value_is_an_item_not_scored():
    """A NaN per-item value (JSON NaN) was paired like a number: the task's difference read '+nan [—]', its McNemar
    p was lost (NaN is not 0/1) and the average was NaN too. It is left out, as a None one."""
    from types import SimpleNamespace

    rec = lambda vals: SimpleNamespace(extra={"items": {"boolq": {"ids": [0, 1, 2, 3], "metrics": {"acc": vals}}}})  # noqa: E731
    base, other = sig.aligned(rec([0.0, 1.0, 0.0, 1.0]), rec([1.0, float("nan"), None, 1.0]), "boolq", "acc")
    assert list(base) == [0.0, 1.0] and list(other) == [1.0, 1.0]
    assert sig.compare(base, other).p_mcnemar == 1.0


def test_identical_non_binary_values_are_a_zero_ci_and_not_significant():
    """A zero-spread difference of 0 is its own CI [0, 0], which does not exclude 0; a metric that is 0/1 for one
    record only is not an accuracy pair (no McNemar test)."""
    same = np.array([0.3, 0.7, 0.2, 0.9])
    p = sig.compare(same, same.copy())
    assert (p.diff, p.low, p.high, p.p_mcnemar, p.n) == (0.0, 0.0, 0.0, None, 4) and not p.significant
    mixed = sig.compare(np.array([0.0, 1.0, 1.0, 0.0]), np.array([0.5, 1.0, 1.0, 0.0]))
    assert mixed.p_mcnemar is None and mixed.diff == 0.125


def test_average_of_a_task_without_spread_and_one_with_it_is_still_resampled(planted):
    """Only when no task's differences vary is the average its own CI; one varying task gives a CI around it
    (the direct bootstrap's, as above)."""
    base, other = planted
    flat = np.array([1.0, 0.0, 1.0, 1.0])
    avg = sig.compare_average([(flat, flat.copy()), (base, other)])
    assert avg.diff == pytest.approx((other - base).mean() / 2)
    low, high = direct_bootstrap([np.zeros(4), other - base])
    assert avg.low < avg.diff < avg.high and abs(avg.low - low) < 0.006 and abs(avg.high - high) < 0.006


def test_the_verdict_counts_a_significantly_lower_perplexity_as_better():
    """Better is higher for an accuracy, lower for a perplexity: a row that lowered a perplexity and an accuracy, both
    significantly, is one better and one worse, not two worse."""
    ppl = sig.compare(np.array([10.0, 12.0, 11.0, 13.0]), np.array([8.0, 9.5, 9.0, 10.0]))  # every article lower
    acc = sig.compare(np.ones(20), np.r_[np.zeros(12), np.ones(8)])  # 12 lost, none gained: p = 0.0005
    assert ppl.significant and ppl.diff < 0 and acc.significant and acc.diff < 0
    assert sig._verdict({"wikitext": ppl, "arc_easy": acc}, {"wikitext": True, "arc_easy": False}) == "1 better / 0 same / 1 worse"


def test_an_average_over_accuracies_is_judged_by_a_stratified_sign_flip_test_not_the_bootstrap():
    """Two tasks of 20 items, 1 and 3 items lost and none gained: the bootstrap CI of the average, [-20, -2.5] points,
    excluded 0 and starred it, while no task was significant; the exact sign-flip p is 2/16 (all four lost items'
    signs alike)."""
    b1, b2 = np.ones(20), np.ones(20)
    o1, o2 = b1.copy(), b2.copy()
    o1[0], o2[:3] = 0, 0
    p = sig.compare_average([(b1, o1), (b2, o2)])
    assert p.high < 0 and p.p_permutation == pytest.approx(0.125, abs=1e-12) and not p.significant
    assert "p=0.12" in sig._text(p)[0] and "*" not in sig._text(p)[0]


def test_the_sign_flip_test_is_mcnemars_for_one_task_and_its_draws_agree_with_the_exact_count(monkeypatch):
    rng = np.random.default_rng(3)
    base, other = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
    assert sig.sign_flip_p((other - base,)) == pytest.approx(sig.mcnemar_exact(base, other), rel=1e-9)
    tasks = [(rng.integers(0, 2, n).astype(float), rng.integers(0, 2, n).astype(float)) for n in (40, 60, 30)]
    ds = tuple(o - b for b, o in tasks)
    exact = sig.sign_flip_p(ds)
    monkeypatch.setattr(sig, "EXACT_MAX", 0)  # the same test from seeded draws
    assert sig.sign_flip_p(ds) == pytest.approx(exact, abs=0.01) and 0 < exact < 1
    cont = sig.compare_average([(b, o + 0.5) for b, o in tasks])  # not 0/1: the CI decides, as before
    assert cont.p_permutation is None and cont.p_mcnemar is None


def test_the_paired_caption_says_its_p_values_are_unadjusted_and_counts_the_tests():
    """The depth curve's paired table makes 80 tests at 5 % (20 rows × 3 tasks, and each row's Avg) and stars 8;
    under Holm's or Benjamini-Hochberg's correction over those 80 none is left (the smallest adjusted p is 0.21). The
    caption said nothing of multiplicity, so a reader could cite each '*' as a finding."""
    from pathlib import Path

    from reports.collect import collect

    root = Path(__file__).resolve().parents[1]
    caption = sig.paired_table(collect([root / "results" / "issue15" / "depth_curve"])).attrs["caption"]
    assert "not adjusted for multiple comparisons: this table makes 80 tests at 0.05, so about 4.0 would be starred" in caption
    one = sig.paired_table(collect([root / "results" / "issue15" / "paired_8of30"]), "shortgpt").attrs["caption"]
    assert "this table makes 8 tests at 0.05, so about 0.4 would be starred by chance if no method differed from shortgpt" in one


def test_the_paired_csv_holds_benjamini_hochberg_adjusted_p_values_over_the_whole_table():
    """Beside each cell's own p-value, its BH-adjusted one over every p-value of the table (the false discovery rate a
    reader of 20 rows × 4 columns controls), computed here by hand: p_(i) · m / i, then the running minimum from the
    largest p down. On the depth curve none stays under 0.05 (the 8 starred cells are what chance gives)."""
    import io
    from pathlib import Path

    import pandas as pd

    from reports.collect import collect
    from reports.formats import to_csv

    root = Path(__file__).resolve().parents[1]
    csv = pd.read_csv(io.StringIO(to_csv(sig.paired_table(collect([root / "results" / "issue15" / "depth_curve"])))))
    cols = [c[: -len("_p_bh")] for c in csv.columns if c.endswith("_p_bh")]
    assert cols and "Avg" in cols
    raw = [(c, i, csv.at[i, f"{c}_p_mcnemar" if f"{c}_p_mcnemar" in csv else f"{c}_p_permutation"])
           for c in cols for i in csv.index]
    raw = [(c, i, p) for c, i, p in raw if pd.notna(p)]
    assert len(raw) == 80 and sum(p < 0.05 for *_, p in raw) == 8
    order = sorted(range(len(raw)), key=lambda k: raw[k][2])
    by_hand, running = {}, 1.0
    for rank in range(len(order), 0, -1):
        c, i, p = raw[order[rank - 1]]
        running = min(running, p * len(raw) / rank)
        by_hand[c, i] = running
    for (c, i), q in by_hand.items():
        assert csv.at[i, f"{c}_p_bh"] == pytest.approx(q, rel=1e-12), (c, i)
    assert min(by_hand.values()) > 0.05
    assert sum(csv[f"{c}_p_bh"].notna().sum() for c in cols) == 80  # no p_bh where a cell has no p-value
