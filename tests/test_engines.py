"""Reconstruction engines: each one reconstructs, tunes without recompiling, runs batched, refuses
what it does not define, and is searchable in a study."""
import textwrap

import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import recon
from recon import engine
from recon.lower import lower
from recon.plan import PlanError, apply_overrides, plan_from_dict
from tune.study import load_study

ENGINES = ("epie", "rpie", "lsqml", "gauss_newton")


def _plan(tiny_plan_dict, **overrides):
    return plan_from_dict(apply_overrides({**tiny_plan_dict, "iterations": 6}, overrides))


def _phase_correlation(result, truth_path):
    """Pearson r of the reconstructed and true phase over the central object region (no registration)."""
    import h5py

    with h5py.File(truth_path) as f:
        truth = f["ground_truth/phase_sum"][()]
    dx = result.dx_A
    iy, ix = np.mgrid[0:result.phase.shape[0], 0:result.phase.shape[1]]
    gy = np.round((result.origin_yx_A[0] + iy * dx) / dx).astype(int) % truth.shape[0]
    gx = np.round((result.origin_yx_A[1] + ix * dx) / dx).astype(int) % truth.shape[1]
    c = slice(result.phase.shape[0] // 3, 2 * result.phase.shape[0] // 3)
    return np.corrcoef(result.phase[c, c].ravel(), truth[gy, gx][c, c].ravel())[0, 1]


@pytest.mark.parametrize("name", ENGINES)
def test_each_engine_reconstructs(tiny_plan_dict, tiny_data_path, name):
    plan = _plan(tiny_plan_dict, **{"engine.name": name, "iterations": 8})
    result = recon.reconstruct(plan)
    loss = result.history["data_loss"]
    assert result.stop_reason == "completed" and not result.diverged and len(loss) == 8
    assert set(result.history) >= {"loss", "data_loss", "time_s"}
    assert loss[-1] < 0.5 * loss[0]
    assert _phase_correlation(result, tiny_data_path) > 0.5


def test_default_engine_is_gradient(tiny_plan_dict):
    plan = plan_from_dict(tiny_plan_dict)
    assert plan.engine.name == "gradient"
    low = lower(plan, recon.load_dataset(plan.data))
    assert low.static.engine == "gradient" and low.static.fit == ()


@pytest.mark.parametrize("name, variants", [
    ("epie", [{"alpha": 1.0, "beta": 1.0}, {"alpha": 0.5, "beta": 0.2}]),
    ("rpie", [{"alpha": 0.1, "beta": 0.5}, {"alpha": 0.3, "beta": 0.9}]),
    ("lsqml", [{"lsqml_step": 0.9, "lsqml_delta": 0.1}, {"lsqml_step": 0.5, "lsqml_delta": 0.01}]),
    ("gauss_newton", [{"damping": 0.01, "cg_iterations": 2}, {"damping": 0.5, "cg_iterations": 5}]),
])
def test_engine_parameters_are_traced(tiny_plan_dict, name, variants):
    dataset = recon.load_dataset(plan_from_dict(tiny_plan_dict).data)
    before = engine.compile_count()
    results = [recon.reconstruct(_plan(tiny_plan_dict, engine={"name": name, **v}, iterations=2), dataset=dataset)
               for v in variants]
    assert engine.compile_count() - before <= 3  # init, iteration, outputs: once for both plans
    assert not np.allclose(results[0].object, results[1].object)


def test_a_non_gradient_engine_runs_batched(tiny_plan_dict):
    dataset = recon.load_dataset(plan_from_dict(tiny_plan_dict).data)
    # eps 1e-2: the modulus projection √(y / (I + ε)) amplifies rounding-level intensities in the dark
    # field (as the Poisson gradient does, see test_recon_batch), which vmap rounds differently
    plans = [_plan(tiny_plan_dict, **{"engine": {"name": "epie", "alpha": a, "beta": b}, "iterations": 3,
                                      "probe.defocus_A": d, "noise_model.eps": 1e-2})
             for a, b, d in [(1.0, 1.0, -100.0), (0.5, 0.3, -80.0)]]
    batched = recon.reconstruct_batch(plans, dataset=dataset)
    for b, plan in zip(batched, plans):
        alone = recon.reconstruct(plan, dataset=dataset)
        assert b.iterations_done == 3 and b.stop_reason == "completed"
        np.testing.assert_allclose(b.history["loss"], alone.history["loss"], rtol=1e-3)
        assert np.linalg.norm(b.object - alone.object) <= 1e-3 * np.linalg.norm(alone.object - 1)
    assert not np.allclose(batched[0].object, batched[1].object)
    # Gauss-Newton: a traced CG bound that differs between the trials of one batch
    gn = [_plan(tiny_plan_dict, engine={"name": "gauss_newton", "cg_iterations": k}, iterations=2) for k in (2, 6)]
    results = recon.reconstruct_batch(gn, dataset=dataset)
    assert all(r.stop_reason == "completed" for r in results)
    assert not np.allclose(results[0].object, results[1].object)


@pytest.mark.parametrize("overrides, expected", [
    ({"engine.name": "epie", "noise_model.name": "anscombe"},
     "engine: engine epie does not define noise_model.name 'anscombe'; allowed with it: amplitude, poisson"),
    ({"engine.name": "rpie", "noise_model.name": "intensity"}, "noise_model.name 'intensity'"),
    ({"engine.name": "lsqml", "regularizers.object_tv": 1e-3}, "does not use regularizers.object_tv"),
    ({"engine.name": "gauss_newton", "optimizers.positions.learning_rate": 0.1},
     "does not refine positions (optimizers.positions.learning_rate)"),
    ({"engine.name": "newton"}, "engine.name: allowed values are 'gradient', 'epie'"),
    ({"engine.cg_iterations": 0}, "engine.cg_iterations"),
])
def test_what_an_engine_does_not_define_is_one_line_naming_the_key(tiny_plan_dict, overrides, expected):
    with pytest.raises(PlanError) as err:
        plan_from_dict(apply_overrides(tiny_plan_dict, overrides))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_gauss_newton_accepts_every_noise_model(tiny_plan_dict):
    for name in ("amplitude", "anscombe", "poisson", "intensity"):
        plan_from_dict(apply_overrides(tiny_plan_dict, {"engine.name": "gauss_newton", "noise_model.name": name}))


def test_a_study_searches_the_engine_and_its_parameters(tmp_path):
    path = tmp_path / "study.yml"
    path.write_text(textwrap.dedent("""\
        study: {name: engines, n_trials: 4}
        data: {simulate: {pattern_px: 16, scan_shape: [4, 4]}}
        recon: {iterations: 3}
        search:
          recon.engine.name: {choices: [gradient, epie, rpie, lsqml, gauss_newton]}
          recon.engine.alpha: {low: 0.05, high: 1.0}
          recon.engine.damping: {low: 1.0e-4, high: 1.0, log: true}
          recon.engine.cg_iterations: {low: 1, high: 8}
        """))
    config = load_study(path)
    dists = {p.name: p.distribution for p in config.params}
    assert dists["engine.name"] == CategoricalDistribution(("gradient", "epie", "rpie", "lsqml", "gauss_newton"))
    assert dists["engine.alpha"] == FloatDistribution(0.05, 1.0)
    assert dists["engine.damping"] == FloatDistribution(1e-4, 1.0, log=True)
    assert dists["engine.cg_iterations"] == IntDistribution(1, 8)
    path.write_text(path.read_text().replace("recon: {iterations: 3}",
                                             "recon: {iterations: 3, noise_model: {name: anscombe}}"))
    with pytest.raises(PlanError, match="noise_model.name 'anscombe'"):
        load_study(path)
