"""`harness.evaluate` / `load_results`: the call's own rows, Python tuples as lists, NaN for a missing
value, and a refused cell as bad input."""

import shutil

import pytest

import harness
from harness.errors import UsageError


def test_evaluate_returns_its_own_rows_only(tmp_path, data_dir):
    common = dict(model="random:tiny", device="cpu", tasks="arc_easy", mode="disaggregated", quiet=True,
                  data_dir=str(data_dir))
    first = harness.evaluate(methods=("unpruned", "tail"), set="tail.k=1", limit=2, out=str(tmp_path / "a"), **common)
    assert sorted(first["method"].unique()) == ["tail", "unpruned"]  # a tuple of methods, as a list would be
    assert first["stderr"].dtype == "float64" and first["value"].dtype == "float64"  # 2 items: stderr may be missing
    shutil.copytree(tmp_path / "a", tmp_path / "b" / "earlier")  # another run below the next call's out
    again = harness.evaluate(methods=["unpruned"], limit=3, out=str(tmp_path / "b"), **common)
    assert len(again) == len(first[first["method"] == "unpruned"]) and set(again["n_samples"]) == {3}
    assert len(harness.load_results(tmp_path / "b")) == len(again) + len(first)  # load_results searches below
    with pytest.raises(UsageError, match="exit status 2"):  # out holds another configuration's record: bad input
        harness.evaluate(methods=["unpruned"], limit=4, out=str(tmp_path / "b"), **common)
