"""The on-disk cache of calibration statistics: an interrupted search resumes where it stopped, a
second plan does no forward, a torn entry is recomputed, and `HARNESS_CALIBRATION_CACHE=off` writes nothing."""

import dataclasses
import errno
import json
import os
import random
import threading
import warnings
from pathlib import Path

import pytest

import methods
from harness.pd import arch
from harness.quality.calibration import CalibConfig, build_calibration
from harness.store import cache
from methods.depth import ranked
from methods.depth.perplexity import CalibNLL
from methods.pdtrim import method as pdtrim_method
from methods.pdtrim.objectives import StageObjective

PDTRIM = dict(k_prefill=1, k_decode=2, k_unified=2, search_samples=8, sensitivity_samples=4, max_cont=8, probe_prompts=2,
              probe_tokens=64, probe_steps=3, n_first=2, n_last=6, anneal_steps=3)
SLEB = dict(k=2, keep_first=0, keep_last=0, samples=12)


@pytest.fixture(scope="module")
def calib(tiny, data_dir):
    return build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))


def make(name, **options):
    cls = methods.get(name)
    return cls(dataclasses.replace(cls.config_for_layers(4), **options))  # the tiny model's 4 layers


def layers(plan):
    return plan.prefill_layers, plan.decode_layers, plan.kv_policy


class Interrupt:
    """Counts objective evaluations (what was evaluated, in order); raises KeyboardInterrupt at `stop_at`."""

    def __init__(self, monkeypatch, cls, names, stop_at=None):
        self.seen, self.stop_at = [], stop_at
        for name in names:
            real = getattr(cls, name)
            monkeypatch.setattr(cls, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def fn(obj, *args, **kwargs):
            if self.stop_at is not None and len(self.seen) + 1 == self.stop_at:
                raise KeyboardInterrupt
            self.seen.append((name, getattr(obj, "full_tokens", 0), *(tuple(sorted(a)) for a in args)))
            return real(obj, *args, **kwargs)
        return fn


@pytest.fixture
def forwards(tiny):
    calls, handles = [], [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in arch.decoder_layers(tiny.model)]
    yield calls
    for h in handles:
        h.remove()


def run_interrupted(monkeypatch, own_cache_dir, plan, cls, names, seed):
    """The uninterrupted result (cache off), then a run stopped at a seeded evaluation count and a rerun
    (cache on); returns (reference result, evaluations of the reference, before the stop, of the rerun)."""
    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    ref_count = Interrupt(monkeypatch, cls, names)
    ref = plan()
    monkeypatch.undo()  # the counting wrappers and the env var
    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", str(own_cache_dir))
    stop_at = random.Random(seed).randint(2, len(ref_count.seen) - 1)
    first = Interrupt(monkeypatch, cls, names, stop_at=stop_at)
    with pytest.raises(KeyboardInterrupt):
        plan()
    monkeypatch.undo()
    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", str(own_cache_dir))
    rerun = Interrupt(monkeypatch, cls, names)
    again = plan()
    assert len(first.seen) == stop_at - 1
    return ref, again, ref_count.seen, first.seen, rerun.seen


@pytest.mark.parametrize("seed", [0, 1])
def test_an_interrupted_pdtrim_search_resumes_where_it_stopped(tiny, calib, monkeypatch, own_cache_dir, seed):
    def plan():
        pdtrim_method._SHARED_STATES.clear()  # a new process: only the disk cache remembers
        return make("pdtrim", **PDTRIM).plan(tiny.model, calib, "disaggregated")

    ref, again, every, before, after = run_interrupted(monkeypatch, own_cache_dir, plan, StageObjective,
                                                       ["prefill", "decode"], seed)
    assert layers(again) == layers(ref)
    assert again.info["removed_prefill"] == ref.info["removed_prefill"]
    assert again.info["search_trace"] == ref.info["search_trace"]  # the same values, read back exactly
    assert not set(after) & set(before)  # nothing evaluated before the interruption is evaluated again
    assert 0 < len(after) < len(every) and len(before) + len(after) == len(every)


@pytest.mark.parametrize("seed", [0, 1])
def test_an_interrupted_sleb_search_resumes_where_it_stopped(tiny, calib, monkeypatch, own_cache_dir, seed):
    def plan():
        ranked._SHARED.clear()  # a new process: only the disk cache remembers
        return make("sleb", **SLEB).plan(tiny.model, calib, "unified")

    ref, again, every, before, after = run_interrupted(monkeypatch, own_cache_dir, plan, CalibNLL, ["_nll"], seed)
    assert layers(again) == layers(ref)
    assert again.info["steps"] == ref.info["steps"]
    assert not set(after) & set(before)
    assert 0 < len(after) < len(every) and len(before) + len(after) == len(every)


@pytest.mark.parametrize("name,options,mode", [("pdtrim", PDTRIM, "disaggregated"), ("pdtrim", PDTRIM, "unified"),
                                               ("shortgpt", dict(k=1), "unified"), ("sleb", SLEB, "unified"),
                                               ("stage:shortened_ppl", dict(k_prefill=1, k_decode=2), "disaggregated")])
def test_a_second_plan_in_a_new_process_does_no_forward(tiny, calib, forwards, capfd, name, options, mode):
    ranked._SHARED.clear()
    first = make(name, **options).plan(tiny.model, calib, mode)
    assert forwards and "reused cached" not in capfd.readouterr().err
    forwards.clear()
    ranked._SHARED.clear()  # a fresh process: a new instance, nothing in memory, the cache on disk
    pdtrim_method._SHARED_STATES.clear()
    second = make(name, **options).plan(tiny.model, calib, mode)
    assert forwards == []
    assert layers(second) == layers(first)
    assert "calibration: reused cached" in capfd.readouterr().err


@pytest.mark.parametrize("name", ["tail", "random"])
def test_a_ranking_reused_by_a_method_without_calibration_is_not_called_calibration(tiny, capfd, name):
    """tail and random read no calibration data: a ranking they reuse is said to be planning's, not calibration's."""
    ranked._SHARED.clear()
    first = make(name, k=1).plan(tiny.model, None, "unified")
    capfd.readouterr()
    ranked._SHARED.clear()  # a fresh process: the cache on disk
    assert layers(make(name, k=1).plan(tiny.model, None, "unified")) == layers(first)
    err = capfd.readouterr().err
    assert f"planning: reused cached block ranking: {name}" in err and "calibration" not in err, err


def test_pdtrim_replay_from_the_disk_memo_builds_no_objective(tiny, calib, monkeypatch):
    made = []
    real = StageObjective.__init__
    monkeypatch.setattr(StageObjective, "__init__", lambda self, *a, **k: made.append(1) or real(self, *a, **k))
    make("pdtrim", **PDTRIM).plan(tiny.model, calib, "disaggregated")
    assert len(made) == 2  # search and sensitivity objectives
    pdtrim_method._SHARED_STATES.clear()  # a new process
    plan = make("pdtrim", **PDTRIM).plan(tiny.model, calib, "disaggregated")
    assert len(made) == 2 and plan.info["work"]["evaluations"] == 0


def test_a_corrupt_entry_is_ignored_with_a_warning_and_recomputed(tiny, calib, own_cache_dir, forwards):
    ranked._SHARED.clear()
    first = make("sleb", **SLEB).plan(tiny.model, calib, "unified")
    entries = sorted(own_cache_dir.rglob("*.json"))
    assert {p.parent.name for p in entries} == {"ranking", "calib-nll"}
    for p in entries:
        p.write_text(p.read_text()[: len(p.read_text()) // 2])  # torn, as no atomic write would leave it
    ranked._SHARED.clear()
    forwards.clear()
    with pytest.warns(cache.CacheWarning, match="unreadable"):
        again = make("sleb", **SLEB).plan(tiny.model, calib, "unified")
    assert forwards and layers(again) == layers(first) and again.info["steps"] == first.info["steps"]
    assert all(json.loads(p.read_text())["value"] for p in entries)  # rewritten whole


def test_cache_off_writes_nothing(tiny, calib, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))  # where the default folder would be
    ranked._SHARED.clear()
    for name, options in [("pdtrim", PDTRIM), ("sleb", SLEB), ("shortgpt", dict(k=1))]:
        make(name, **options).plan(tiny.model, calib, "disaggregated")
    assert cache.cache_dir() is None and cache.save("x", {"a": 1}, 1) is None
    assert list(tmp_path.rglob("*")) == []


def test_the_cache_lives_under_the_harness_cache_folder_unless_told(monkeypatch, tmp_path):
    monkeypatch.delenv("HARNESS_CALIBRATION_CACHE")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "calibration"  # beside the converted models, not among them
    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "x"


def test_a_literal_tilde_in_the_cache_folder_is_the_home_folder_for_models_too(monkeypatch, tmp_path):
    """A Dockerfile ENV or a CI env block passes `~/hc` unexpanded: converted models went to a `./~/hc` folder
    in the current directory (and converted again there), while calibration entries went to $HOME/hc."""
    from harness.pd.gguf import cache_root

    monkeypatch.delenv("HARNESS_CALIBRATION_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HARNESS_CACHE_DIR", "~/hc")
    assert cache_root() == tmp_path / "hc" and cache.cache_dir() == tmp_path / "hc" / "calibration"


def test_store_keys_values_and_concurrent_writers(own_cache_dir):
    key = {"model": "abc", "options": {"k": 2, "sets": (1, 2)}}
    assert cache.load("demo", key) is None
    cache.save("demo", key, {"1,2": 0.25})
    assert cache.load("demo", key) == {"1,2": 0.25}
    assert cache.load("demo", {**key, "model": "abd"}) is None
    assert cache.digest(key) == cache.digest(dict(reversed(list(key.items()))))
    # a file under this key's digest that holds another key is not this key's entry
    path = cache.entry_path("demo", key)
    path.write_text(json.dumps({"key": {"model": "other"}, "value": 1}))
    assert cache.load("demo", key) is None
    # writers racing on one key: a reader only ever sees a complete value (last writer wins)
    values = [{str(i): [i] * 2000} for i in range(8)]
    seen, errors = [], []

    def write(v):
        for _ in range(10):
            cache.save("demo", key, v)

    def read():
        with warnings.catch_warnings(record=True) as w:
            for _ in range(100):
                seen.append(cache.load("demo", key))
            errors.extend(w)

    threads = [threading.Thread(target=write, args=(v,)) for v in values] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(s is None or s in values for s in seen)
    assert cache.load("demo", key) in values
    assert not [p for p in own_cache_dir.rglob("*") if p.name.endswith(".tmp")]


def test_a_quiet_run_still_shows_the_cache_warning(tiny, calib, own_cache_dir):
    """quiet_libraries() silences the libraries' warnings, not the harness's own (docs/cache.md promises this one)."""
    from harness.run.quiet import quiet_libraries

    ranked._SHARED.clear()
    make("sleb", **SLEB).plan(tiny.model, calib, "unified")
    for p in own_cache_dir.rglob("*.json"):
        p.write_text("{")
    ranked._SHARED.clear()
    with warnings.catch_warnings(record=True) as caught:
        quiet_libraries()
        warnings.warn("a library's chatter", DeprecationWarning, stacklevel=1)
        make("sleb", **SLEB).plan(tiny.model, calib, "unified")
    assert {w.category for w in caught if "unreadable" in str(w.message)} == {cache.CacheWarning}
    assert not [w for w in caught if w.category is DeprecationWarning]


def _fail_under(monkeypatch, root, failure):
    """Make the cache's writes under `root` fail as a read-only or full disk would, at `failure`'s step."""
    def inside(p):
        return Path(p).resolve().is_relative_to(root.resolve())

    def fail(code):
        raise OSError(code, os.strerror(code))

    if failure == "mkdir":
        real_mkdir = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: fail(errno.EROFS) if inside(self) else real_mkdir(self, *a, **k))
    elif failure == "write":
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: fail(errno.ENOSPC) if inside(os.readlink(f"/proc/self/fd/{fd}"))
                            else real_fsync(fd))
    else:
        real_replace = os.replace
        monkeypatch.setattr(os, "replace", lambda src, dst, **k: fail(errno.EROFS) if inside(dst) else real_replace(src, dst, **k))


PLANS = [("shortgpt", dict(k=1)), ("sleb", SLEB), ("pdtrim", PDTRIM)]


def _plans(tiny, calib):
    ranked._SHARED.clear()
    pdtrim_method._SHARED_STATES.clear()
    plans = [make(name, **options).plan(tiny.model, calib, "disaggregated") for name, options in PLANS]
    return [(layers(p), p.info.get("steps"), p.info.get("search_trace")) for p in plans]


@pytest.mark.parametrize("failure", ["mkdir", "write", "rename"])
def test_an_unwritable_cache_warns_once_and_plans_as_without_it(tiny, calib, monkeypatch, own_cache_dir, failure):
    """A read-only or full cache folder costs time, never a cell: one CacheWarning (shown in quiet runs), the same plans."""
    from harness.run.quiet import quiet_libraries

    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", "off")
    uncached = _plans(tiny, calib)
    monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", str(own_cache_dir))
    _fail_under(monkeypatch, own_cache_dir, failure)
    with warnings.catch_warnings(record=True) as caught:
        quiet_libraries()
        assert _plans(tiny, calib) == uncached
    ours = [str(w.message) for w in caught if w.category is cache.CacheWarning]
    assert len(ours) == 1, ours  # once per folder, not per entry (SLEB and PDTrim write after every evaluation)
    assert str(own_cache_dir) in ours[0] and "continues uncached" in ours[0] and "HARNESS_CALIBRATION_CACHE=off" in ours[0]
    assert not list(own_cache_dir.rglob("*.json")) and not list(own_cache_dir.rglob("*.tmp"))


def test_an_unwritable_cache_warns_once_per_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "atomic_write", lambda path, text: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for folder in ("a", "b"):
            monkeypatch.setenv("HARNESS_CALIBRATION_CACHE", str(tmp_path / folder))
            assert [cache.save(kind, {"i": i}, i) for kind in ("x", "y") for i in range(3)] == [None] * 6
    assert [str(w.message).split(" cannot")[0] for w in caught] == [f"calibration cache {tmp_path / f}" for f in "ab"]


def test_weights_edited_away_from_each_tensors_ends_key_other_entries(tiny):
    """The cache key read the first and last 8 values of each tensor only: weights edited anywhere else behind the
    same model path (a pruned or edited checkpoint) reused the cached statistics of the old ones."""
    import copy

    import torch

    from methods.base import model_fingerprint

    edited = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in edited.parameters():
            if p.numel() > 64:
                p.view(-1)[32:-32] *= 1.5
    assert model_fingerprint(edited) != model_fingerprint(tiny.model)
    assert model_fingerprint(copy.deepcopy(tiny.model)) == model_fingerprint(tiny.model)


def _edit_value(path: Path, fn) -> None:
    entry = json.loads(path.read_text())
    entry["value"] = fn(entry["value"])
    path.write_text(json.dumps(entry))


@pytest.mark.parametrize("name,kind,edit", [
    ("shortgpt", "ranking", lambda v: {**v, "order": [1, 1, 1]}),  # a removal order with a block twice
    ("shortgpt", "ranking", lambda v: {**v, "order": ["x", 1, 2]}),  # crashed the cell (int("x"))
    ("shortgpt", "ranking", lambda v: {**v, "order": [9, 1, 2]}),  # no block 9 in a 4-block model
    ("shortgpt", "block-cosines", lambda v: ["x", *v[1:]]),
    ("shortgpt", "block-cosines", lambda v: [float("nan"), *v[1:]]),
    ("sleb", "calib-nll", lambda v: {k: "x" for k in v}),
    ("pdtrim", "pdtrim-search", lambda v: {**v, "p:1,x": 0.5}),  # a key the search cannot parse
    ("pdtrim", "pdtrim-search", lambda v: {k: -1e300 * 1e300 for k in v}),  # every value -inf
    ("pdtrim", "pdtrim-probe", lambda v: {k: "x" for k in v}),
])
def test_an_entry_that_parses_but_cannot_be_right_is_ignored_with_a_warning(tiny, calib, own_cache_dir, name, kind, edit):
    """A cache entry edited into a wrong value was trusted: an order [1, 1, 1] gave shortgpt.k=2 a plan removing one
    block (docs/cache.md promises a warning and a recompute), ["x", 1] failed the cell. Each is now recomputed."""
    options = {"shortgpt": dict(k=2), "sleb": SLEB, "pdtrim": PDTRIM}[name]
    mode = "disaggregated" if name == "pdtrim" else "unified"
    ranked._SHARED.clear()
    pdtrim_method._SHARED_STATES.clear()
    first = make(name, **options).plan(tiny.model, calib, mode)
    entries = sorted((own_cache_dir / kind).rglob("*.json")) if (own_cache_dir / kind).is_dir() else \
        sorted(p for p in own_cache_dir.rglob("*.json") if p.parent.name == kind)
    assert entries, sorted(p.parent.name for p in own_cache_dir.rglob("*.json"))
    for p in entries:
        _edit_value(p, edit)
    for p in own_cache_dir.rglob("*.json"):  # the ranking, made from what was edited, must be recomputed too
        if p.parent.name == "ranking" and kind != "ranking":
            p.unlink()
    ranked._SHARED.clear()
    pdtrim_method._SHARED_STATES.clear()
    with pytest.warns(cache.CacheWarning, match="ignoring"):
        again = make(name, **options).plan(tiny.model, calib, mode)
    assert layers(again) == layers(first)
