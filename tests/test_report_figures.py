"""The report's figures read as a researcher reads them: legends beside the axes when long, variants in the tables' order,
every block on a per-block axis, and what the command says of the figures it rendered."""

import matplotlib.pyplot as plt
from test_report_mixing import _rec

from harness.store.records import save
from reports.collect import collect


def _long_context(method: str, removed=(), per_token: int = 100):
    """A disaggregated record with pd_ppl KV bytes at 512 and 1024 prompt tokens (`per_token` bytes a token)."""
    r = _rec(method, removed=removed)
    r.extra["kv_by_setting"] = {"pd_ppl": {f"T{n}": {"kv_bytes": 2 * n * per_token, "handoffs": 2} for n in (512, 1024)}}
    return r


def test_the_kv_bytes_figure_puts_a_long_legend_beside_the_axes(tmp_path):
    """A baselines run (results/issue6/default: 15 methods) drew its 15-entry legend inside the axes of
    bytes_vs_prompt, over the lines it names (unpruned's at 1024 tokens was hidden); the other figures put a legend of
    more than 8 entries beside the axes."""
    from reports.plots import plot_bytes_vs_prompt

    save(_long_context("unpruned"), tmp_path)
    for i in range(12):
        save(_long_context(f"m{i}", removed=(1,), per_token=60 + i), tmp_path)
    fig = plot_bytes_vs_prompt(collect([tmp_path]))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert len(ax.get_legend().get_texts()) == 13
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside: it covers no line
    plt.close(fig)
    few = tmp_path / "few"
    save(_long_context("unpruned"), few)
    save(_long_context("x", removed=(1,), per_token=60), few)
    fig = plot_bytes_vs_prompt(collect([few]))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent().x1 <= ax.get_window_extent().x1  # two entries stay inside
    plt.close(fig)


def test_every_figure_orders_a_sweeps_variants_as_the_tables_do(tmp_path):
    """The tables and the depth curve sort `@k=2` before `@k=10`; the legends of score_vs_kv, bytes_vs_prompt and
    latency_bars sorted labels as text (the depth curve's score_vs_kv legend read pdtrim@k_decode=10, =2, =4, ...)."""
    from harness.store.latency import WorkloadLatency
    from reports.plots import plot_bytes_vs_prompt, plot_latency_bars, plot_score_vs_kv

    names = ["unpruned", "x@k=2", "x@k=4", "x@k=10"]
    for i, name in enumerate(names):
        save(_long_context(name, removed=tuple(range(i)), per_token=100 - i), tmp_path / "quality")
        r = _rec(name, removed=tuple(range(i)))
        r.config["kind"] = "latency"
        r.latency = {"latency_T16_n4_b1": WorkloadLatency({"ttft_ms_p50": 5.0, "tpot_ms_p50": 2.0}, {})}
        save(r, tmp_path / "latency")
    quality, latency = collect([tmp_path / "quality"]), collect([tmp_path / "latency"])
    for fig in (plot_score_vs_kv(quality), plot_bytes_vs_prompt(quality), plot_latency_bars(latency)):
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_legend().get_texts()] == names
        plt.close(fig)


def test_the_stage_sensitivity_panel_spans_every_block_and_says_a_missing_bar_was_not_measured(tmp_path):
    """PDTrim stores no sensitivity (null) for blocks its search never considered: the depth curve's pdtrim lacks blocks
    0, 1, 28 and 29, and its panel's axis ran from block 2 to 27 beside a block-score panel of 0 to 29, with nothing
    saying why blocks had no bar."""
    from reports.plots import plot_sensitivity

    r = _rec("pdtrim", removed=(1,))
    r.plan["info"] = {"stage_sensitivity": {"prefill": [None, 0.5, 0.2, None, None], "decode": [None, 0.3, 0.1, 0.2, None]},
                      "block_influence": [0.9, 0.1, 0.2, 0.3, 0.8]}
    save(r, tmp_path)
    fig = plot_sensitivity(collect([tmp_path]))
    sens, scores = fig.axes
    assert sens.get_xlim() == (-0.5, 4.5)
    assert sens.get_xlabel() == "block index (no bar: not measured)" and scores.get_xlabel() == "block index"
    plt.close(fig)


def test_no_plots_says_no_figure_was_rendered_not_that_the_folder_holds_none(tmp_path, cli):
    """With --no-plots the last line read '0 figures in OUT/figures' while that folder kept an earlier report's."""
    save(_rec("unpruned"), tmp_path / "run")
    save(_rec("x", removed=(1,)), tmp_path / "run")
    assert cli("report", tmp_path / "run", "--out", tmp_path / "rep").returncode == 0
    r = cli("report", tmp_path / "run", "--out", tmp_path / "rep", "--no-plots")
    assert r.returncode == 0 and "no figures rendered (--no-plots)" in r.stderr and "0 figures" not in r.stderr
    assert (tmp_path / "rep" / "figures" / "score_vs_kv.png").is_file()  # the earlier report's, left as they were
