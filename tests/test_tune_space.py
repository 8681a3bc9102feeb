"""Trials are built from pure configuration, and every search path reaches the physics.

Each shipped study's search parameters are applied, one at a time at two values, to a tiny
simulated dataset: the reconstruction the engine returns (object, probe, positions or loss) must
change. Nothing is read from the shared data (the studies' own data paths are not used).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution

import recon
from tune.single import run_plan
from tune.space import suggest, trial_plan
from tune.study import load_study

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted(p for p in (REPO / "studies").glob("*.yml") if not p.name.endswith("_recon.yml"))


def two_values(distribution) -> tuple:
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0], distribution.choices[1]
    return distribution.low, distribution.high


def middle(distribution):
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0]
    if distribution.log:
        value = float(np.sqrt(distribution.low * distribution.high))
    else:
        value = (distribution.low + distribution.high) / 2
    return round(value) if isinstance(distribution.low, int) else value


def outputs(result: recon.Result) -> np.ndarray:
    """Everything a trial's score could depend on, flattened."""
    parts = [np.abs(result.object).ravel(), np.angle(result.object).ravel(), np.abs(result.probe).ravel(),
             np.asarray(result.positions_yx_A).ravel(), np.asarray(result.history["loss"])[-1:]]
    return np.concatenate([np.asarray(p, dtype=float) for p in parts])


def test_shipped_studies_validate():
    assert {p.name for p in STUDIES} >= {"demo.yml", "mos2_optics.yml", "mos2_lowdose_reg.yml", "sto_slices.yml",
                                         "mos2_multiobjective.yml"}
    for path in STUDIES:
        config = load_study(path)
        assert config.params and config.budget >= 30


def test_shipped_files_name_the_data_they_need():
    """From a clean clone every study and plan either simulates its data or names, in one `# data:`
    comment line, the file of the user's its data.path (relative to the study file) points at."""
    for path in sorted((REPO / "studies").glob("*.yml")):
        text = path.read_text()
        data = yaml.safe_load(text)["data"]
        if "simulate" in data:
            continue
        file = Path(data["path"])
        assert not file.is_absolute() and ".." not in file.parts, path.name
        assert [line for line in text.splitlines() if line.startswith("# data:") and file.name in line], path.name


def test_no_machine_paths_in_the_repository():
    machine = ("/wo" "rk/", "../../sha" "red")  # split, so that this file does not match itself
    files = [REPO / "README.md", REPO / "pyproject.toml", *(p for folder in ("recon", "metrics", "tune", "tests",
             "studies", "benchmarks", ".ci") for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yml", ".md", "")
             and p.is_file())]
    found = [f"{p.relative_to(REPO)}: {m}" for p in files for m in machine if m in p.read_text(errors="replace")]
    assert not found


def test_trial_plans_are_fresh_and_never_share_state():
    config = load_study(STUDIES[0])
    base_dump = config.base_plan.model_dump()
    a = trial_plan(config.base_plan, {"probe.defocus_A": -123.0})
    b = trial_plan(config.base_plan, {"optimizers.object.learning_rate": 0.2})
    assert a.probe.defocus_A == -123.0 and b.probe.defocus_A == config.base_plan.probe.defocus_A
    assert b.optimizers.object.learning_rate == 0.2 and a.optimizers.object.learning_rate != 0.2
    assert config.base_plan.model_dump() == base_dump  # the base plan is untouched


def test_suggested_values_land_in_the_plan():
    config = load_study(STUDIES[0])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(3):
        trial = study.ask()
        values = suggest(trial, config.params)
        plan = trial_plan(config.base_plan, values)
        dump = plan.model_dump()
        for name, value in values.items():
            node = dump
            for part in name.split("."):
                node = node[part]
            assert node == value
        study.tell(trial, 1.0)


@pytest.fixture(scope="module")
def tiny_dataset(tiny_data_path):
    plan = recon.plan_from_dict({"data": {"path": str(tiny_data_path), "patterns": "dp"}})
    return recon.load_dataset(plan.data)


def test_sampled_defocus_changes_the_probe_the_engine_uses(tiny_data_path, tiny_dataset):
    config = load_study(STUDIES[0])
    frozen_probe = {"iterations": 1, "batch_size": 16, "data": {"path": str(tiny_data_path), "patterns": "dp"},
                    "optimizers": {"probe": {"learning_rate": 0.0}}}
    base = recon.plan_from_dict({**config.spec.recon, **frozen_probe})
    probes = {}
    for defocus in (-150.0, -10.0):
        plan = trial_plan(base, {"probe.defocus_A": defocus})
        probes[defocus] = recon.reconstruct(plan, dataset=tiny_dataset).probe
        direct = recon.plan_from_dict({**frozen_probe, "probe": {"defocus_A": defocus}})
        np.testing.assert_allclose(recon.reconstruct(direct, dataset=tiny_dataset).probe, probes[defocus], atol=1e-6)
    assert not np.allclose(probes[-150.0], probes[-10.0], atol=1e-3)


def test_tune_recon_saves_beside_the_plan_by_default(tmp_path, tiny_plan_dict, monkeypatch, capsys):
    plan = tmp_path / "plans" / "tiny.yml"
    plan.parent.mkdir()
    plan.write_text(yaml.safe_dump(tiny_plan_dict))
    monkeypatch.chdir(tmp_path)  # not where the plan is
    assert run_plan(Path("plans/tiny.yml")) == 0
    saved = tmp_path / "plans" / "out" / "tiny_result.h5"
    assert saved.is_file() and f"saved {saved}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["plans"]


@pytest.mark.parametrize("study", [  # sto_slices compiles a program for each slice count up to 26: long
    pytest.param(p, marks=pytest.mark.slow) if p.stem == "sto_slices" else p for p in STUDIES], ids=lambda p: p.stem)
def test_every_search_path_reaches_the_physics(study, tiny_data_path, tiny_dataset):
    config = load_study(study)
    tiny = {"iterations": 3, "batch_size": 16, "data": {"path": str(tiny_data_path), "patterns": "dp"}}
    base = recon.plan_from_dict({**config.spec.recon, **tiny})
    # every other parameter sits mid-range, so that e.g. an astigmatism angle meets a nonzero astigmatism
    context = {p.name: middle(p.distribution) for p in config.params}
    for param in config.params:
        results = [recon.reconstruct(trial_plan(base, {**context, param.name: v}), dataset=tiny_dataset)
                   for v in two_values(param.distribution)]
        a, b = (outputs(r) for r in results)
        assert a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-9), f"{study.name}: {param.key} has no effect"
