"""Property-based fuzzing of the shipped study and plan files (hypothesis).

Each example takes a file of studies/, points its data at the tiny test dataset, and mutates it:
keys dropped or renamed, values of the wrong type or out of range, YAML syntax broken, or the
whole file replaced by binary bytes (random, a PNG). Study files then go through `tune start
--check` in this process: the real code path of `tune start` up to the point where it would open
the storage (`load_study` and `preflight`). Each must either pass (status 0) or be rejected with
one line `error: ...` and status 2; never a traceback, and nothing may be written (no SQLite file,
no journal, no output folder). Plan files go through `recon.load_plan` (what `tune recon` runs
first): a Plan or one `PlanError` line.

Profiles: a few hundred examples by default; `PTYTUNE_FUZZ=long` runs 1,200 per test.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import recon
from recon.plan import PlanError
from tune.cli import main

STUDIES = Path(__file__).resolve().parent.parent / "studies"
FILES = sorted(STUDIES.glob("*.yml"))
STUDY_FILES = [p for p in FILES if "study" in (yaml.safe_load(p.read_text()) or {})]
PLAN_FILES = [p for p in FILES if p not in STUDY_FILES]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000") + b"\x1f\x15\xc4\x89" + bytes(20)

settings.register_profile("default", max_examples=250, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=1200, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("long" if os.environ.get("PTYTUNE_FUZZ") == "long" else "default")


def test_shipped_files_are_split_into_studies_and_plans():
    assert len(STUDY_FILES) >= 6 and len(PLAN_FILES) >= 3


def _with_test_data(tree: Any, data_path: Path) -> Any:
    """The file's tree with data.path pointing at the tiny dataset (simulated data stays)."""
    data = tree.get("data") if isinstance(tree, dict) else None
    if isinstance(data, dict) and "path" in data:
        data.update(path=str(data_path), patterns="dp")
    return tree


# --------------------------------------------------------------------------- mutations
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 100), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
    st.sampled_from(["", "-1", "1e999", "nan", "~", "[", "{a: 1}", "0x10", "2024-13-01", "yes", "tpe", "none"]),
)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in the tree (mapping keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


def _parent(tree: Any, path: tuple) -> Any:
    for part in path[:-1]:
        tree = tree[part]
    return tree


def _out_of_range(value: Any, draw: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return draw(ANY_VALUE)
    return draw(st.sampled_from([-value, 0, -1, value * 1e12, -1e300, 1e300, float("nan"), float("inf"),
                                 value + 0.5, 10**30, -(10**30)]))


@st.composite
def mutated_text(draw: Any, source: Path, data_path: Path) -> bytes:
    """One file of studies/, mutated one to three times (tree edits, then maybe text damage)."""
    kind = draw(st.sampled_from(["tree"] * 6 + ["syntax"] * 2 + ["binary"]))
    if kind == "binary":
        return draw(st.one_of(st.binary(min_size=1, max_size=300), st.just(PNG),
                              st.binary(max_size=40).map(lambda b: PNG + b)))
    tree = _with_test_data(yaml.safe_load(source.read_text()), data_path)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(tree)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(tree, path), path[-1]
        op = draw(st.sampled_from(["drop", "rename", "wrong_type", "out_of_range", "wrap"]))
        if op == "drop":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(st.text(max_size=10), st.just(str(key) + "s"), st.just(str(key).upper()),
                                 st.just(str(key)[:-1]), st.integers(-3, 3)))
            parent[new] = parent.pop(key)
        elif op == "out_of_range":
            parent[key] = _out_of_range(parent[key], draw)
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}, str(parent[key])]))
        else:
            parent[key] = draw(ANY_VALUE)
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    if kind == "syntax":
        at = draw(st.integers(0, len(text)))
        junk = draw(st.one_of(st.sampled_from([":", "{", "[", "]", "\t", "- ", "&a", "*b", "!!python/object:os.system",
                                               "'", '"', "%YAML 9.9\n---", "\x00", "\n  bad: indent",
                                               " 2024-13-01", " !!float x", " !!int 0xZZ", " !!set {1, 2}",
                                               " !!binary AAAA", "[" * 3000]),
                              st.text(max_size=8)))
        cut = draw(st.integers(0, 20))
        text = text[:at] + junk + text[at + cut:]
    return text.encode("utf-8", errors="surrogatepass")


# --------------------------------------------------------------------------- properties
def _run_check(study: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["start", str(study), "--check"])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("source", STUDY_FILES, ids=lambda p: p.stem)
def test_shipped_study_passes_the_check(source, tiny_data_path, tmp_path):
    tree = _with_test_data(yaml.safe_load(source.read_text()), tiny_data_path)
    study = tmp_path / source.name
    study.write_text(yaml.safe_dump(tree, sort_keys=False))
    code, out, err = _run_check(study)
    assert code == 0 and "ok" in out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


@given(data=st.data())
def test_mutated_study_files_load_or_fail_in_one_line(data, tiny_data_path):
    source = data.draw(st.sampled_from(STUDY_FILES), label="source")
    content = data.draw(mutated_text(source, tiny_data_path), label="content")
    with tempfile.TemporaryDirectory(prefix="ptytune-fuzz-") as tmp:
        study = Path(tmp) / "study.yml"
        study.write_bytes(content)
        code, out, err = _run_check(study)  # an exception here (a traceback) fails the test
        event(f"status {code}")
        assert code in (0, 2), (code, out, err)
        if code == 2:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), err
            assert "Traceback" not in err
        else:
            assert out.startswith(f"{study}: ok"), out
        left = sorted(p.name for p in Path(tmp).rglob("*"))
        assert left == ["study.yml"], f"the check wrote {left}"  # no .db, no journal, no output folder


@given(data=st.data())
def test_mutated_plan_files_load_or_fail_in_one_line(data, tiny_data_path):
    source = data.draw(st.sampled_from(PLAN_FILES), label="source")
    content = data.draw(mutated_text(source, tiny_data_path), label="content")
    with tempfile.TemporaryDirectory(prefix="ptytune-fuzz-") as tmp:
        plan = Path(tmp) / "plan.yml"
        plan.write_bytes(content)
        try:
            assert isinstance(recon.load_plan(plan), recon.Plan)
            event("loads")
        except PlanError as err:
            event("PlanError")
            assert len(str(err).splitlines()) == 1 and str(err), repr(err)


@pytest.mark.parametrize("content", [PNG, bytes(range(256)), b"\xff\xfe\x00study"], ids=["png", "bytes", "utf16"])
def test_binary_study_file_is_one_line_exit_2(tmp_path, content):
    study = tmp_path / "study.yml"
    study.write_bytes(content)
    code, _, err = _run_check(study)
    assert code == 2 and len(err.splitlines()) == 1 and "not a YAML text file" in err, err
    with pytest.raises(PlanError, match="not a YAML text file"):
        recon.load_plan(study)
