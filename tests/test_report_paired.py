"""The paired table read as a researcher reads it: every row it leaves out is named in its caption."""

from test_report_mixing import _rec

from harness.store.records import save
from reports.collect import collect
from reports.formats import rows
from reports.significance import paired_table


def test_the_paired_caption_names_rows_with_no_per_item_results_to_pair(tmp_path):
    """A report over an old run (records from before `extra.items`, e.g. results/issue3/default) and a new one
    (results/issue15/depth_curve) left the old run's rows out of the paired table without a word: pdtrim and shortgpt
    of the old folder were simply missing, while the caption named every other row it left out."""
    old, new = tmp_path / "old", tmp_path / "new"
    save(_rec("unpruned"), old)  # no per-item results: neither record of the old run can pair
    save(_rec("x", removed=(1,)), old)
    save(_rec("unpruned", items=[0, 1, 0, 1]), new)
    save(_rec("x", items=[1, 1, 0, 1], removed=(1,)), new)
    save(_rec("y", removed=(2,)), new)  # a record of the new run without them, against a baseline that has them
    t = paired_table(collect([old, new]))
    assert list(rows(t)["Method"]) == ["x (new)"]
    assert t.attrs["caption"].endswith("No item paired with its unpruned record (per-item results missing on one "
                                       "side: a record written before records kept them), so no row: x (old), y.")
    everything = paired_table(collect([new]))  # only y is missing there
    assert list(rows(everything)["Method"]) == ["x"] and everything.attrs["caption"].endswith("so no row: y.")


def test_a_row_left_out_of_several_groups_is_named_with_its_group(tmp_path):
    """Over both PD settings the caption read 'so no row: pdtrim, shortgpt, pdtrim, shortgpt': which was which?"""
    for mode in ("disaggregated", "unified"):
        for method, items in (("unpruned", [0, 1, 0, 1]), ("x", [1, 1, 0, 1]), ("y", None)):
            r = _rec(method, items=items, removed=() if method == "unpruned" else (1,))
            r.mode = mode
            save(r, tmp_path)
    caption = paired_table(collect([tmp_path])).attrs["caption"]
    assert caption.endswith("so no row: y (PD-disaggregated), y (PD-unified).")
