"""Fitted optics and their Fisher standard errors: the linear algebra against a dense computation, the
Poisson whitening, a fit on simulated data (fast) and the 2σ coverage over noise realisations (slow)."""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recon
from recon import fit, forward, physics
from recon import gauss_newton as gn
from recon.plan import apply_overrides, plan_from_dict

_spec = importlib.util.spec_from_file_location(
    "fisher_calibration", Path(__file__).parents[1] / "benchmarks" / "fisher_calibration.py")
calibration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(calibration)

SMALL = calibration.SPEC.model_copy(update={"scan_shape": (8, 8)})


def _toy(seed=0, rows=40):
    """A small nonlinear residual r(x, θ, idx) -> (B, 1, 1) with x = {a: (5,), b: (3,)}, θ (2,)."""
    rng = np.random.default_rng(seed)
    m = jnp.asarray(rng.normal(size=(rows, 10)), jnp.float32)
    y = jnp.asarray(rng.normal(size=rows), jnp.float32)

    def residual_fn(x, theta, idx):
        v = jnp.concatenate([x["a"], x["b"], theta])
        return (jnp.tanh(m[idx] @ v) + 0.1 * (m[idx] @ v) ** 2 - y[idx])[:, None, None]

    x = {"a": jnp.asarray(rng.normal(size=5) * 0.3, jnp.float32),
         "b": jnp.asarray(rng.normal(size=3) * 0.3, jnp.float32)}
    theta = jnp.asarray([0.2, -0.1], jnp.float32)
    idx = jnp.arange(rows).reshape(4, rows // 4)
    return residual_fn, x, theta, idx, jnp.ones(idx.shape, jnp.float32)


def test_schur_complement_and_joint_step_match_the_dense_computation():
    residual_fn, x, theta, idx, w = _toy()
    ne = fit.normal_equations(lambda t, i: residual_fn(x, t, i), theta, idx, w)
    reduced = fit.reduce_system(residual_fn, x, theta, ne, idx, w, iterations=50)

    def flat(v):
        return jnp.concatenate([residual_fn({"a": v[:5], "b": v[5:8]}, v[8:], i).ravel() for i in idx])

    v0 = jnp.concatenate([x["a"], x["b"], theta])
    jac = np.asarray(jax.jacfwd(flat)(v0), np.float64)
    info = jac.T @ jac
    fxx, fxt, ftt = info[:8, :8], info[:8, 8:], info[8:, 8:]
    schur = ftt - fxt.T @ np.linalg.solve(fxx, fxt)
    np.testing.assert_allclose(np.asarray(reduced.schur), schur, rtol=2e-3, atol=1e-4 * np.abs(schur).max())
    np.testing.assert_allclose(np.asarray(ne.A), ftt, rtol=1e-4)
    # without damping, θ's step is θ's part of the dense solve of the full normal equations, and x follows
    # it by its linear response −F_xx⁻¹ F_xθ δ
    new_theta, new_x = fit.joint_step(reduced, theta, x, 0.0)
    gradient = jac.T @ np.asarray(flat(v0), np.float64)
    step = -np.linalg.solve(info, gradient)
    np.testing.assert_allclose(np.asarray(new_theta - theta), step[8:], rtol=5e-3, atol=1e-5)
    x_change = -np.linalg.solve(fxx, fxt @ step[8:])
    np.testing.assert_allclose(np.asarray(new_x["a"] - x["a"]), x_change[:5], rtol=5e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_x["b"] - x["b"]), x_change[5:], rtol=5e-3, atol=1e-5)
    # with x's own step (ridge → 0) it is the dense joint step
    own = fit.reduce_system(residual_fn, x, theta, ne, idx, w, iterations=50, step_ridge=0.0)
    new_theta, new_x = fit.joint_step(own, theta, x, 0.0)
    np.testing.assert_allclose(np.asarray(new_theta - theta), step[8:], rtol=5e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_x["a"] - x["a"]), step[:5], rtol=5e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_x["b"] - x["b"]), step[5:8], rtol=5e-3, atol=1e-5)
    # without it, a descent direction of the data term at any damping
    for damping in (0.0, 1.0, 100.0):
        new_theta, new_x = fit.joint_step(reduced, theta, x, damping)
        change = np.concatenate([new_x["a"] - x["a"], new_x["b"] - x["b"], new_theta - theta])
        assert gradient @ change < 0, damping
    # errors: the Schur complement's are larger than those of θ alone
    full = fit.standard_errors("poisson", ne, reduced.schur)
    alone = fit.standard_errors("poisson", ne)
    np.testing.assert_allclose(np.asarray(full), np.sqrt(np.diag(np.linalg.inv(info)))[8:], rtol=5e-3)
    assert np.all(np.asarray(full) >= np.asarray(alone))


def test_poisson_whitening_gives_the_poisson_fisher_information():
    mu = jnp.asarray([[[4.0, 9.0], [1.0, 25.0]]])
    y = jnp.asarray([[[5.0, 7.0], [0.0, 30.0]]])
    mask = jnp.ones((2, 2))
    r, jvp = jax.linearize(lambda m: gn.residuals("poisson", m, y, mask, 1e-6, 1.0), mu)
    d_mu = jnp.asarray([[[1.0, 2.0], [0.5, -1.0]]])
    np.testing.assert_allclose(np.sum(np.asarray(jvp(d_mu)) ** 2), np.sum(d_mu**2 / mu), rtol=1e-6)  # Σ(∂μ)²/μ
    np.testing.assert_allclose(np.asarray(r), (mu - y) / np.sqrt(mu), rtol=1e-6)


def test_floored_poisson_change_is_the_difference_of_the_objective_whose_gradient_the_step_follows():
    floor = gn.POISSON_FLOOR * 1.0  # mean pixel 1
    y = jnp.asarray([[[0.0, 1.0, 3.0], [7.0, 0.0, 2.0]]])
    old = jnp.asarray([[[0.004, 0.02, 2.0], [7.5, 0.5, 0.009]]])  # below and above the floor
    new = jnp.asarray([[[0.006, 0.005, 2.2], [7.4, 0.003, 0.02]]])  # both sides, and crossing it both ways

    def phi(i):  # float64: I − y log I above the floor, its quadratic continuation below
        i, yy = np.asarray(i, np.float64), np.asarray(y, np.float64)
        at_floor = floor - yy * np.log(floor)
        return np.where(i >= floor, i - yy * np.log(np.maximum(i, floor)),
                        at_floor + (floor - yy) * (i - floor) / floor + (i - floor) ** 2 / (2 * floor))

    change = gn.floored_poisson_change(new, old, y, jnp.ones((2, 3)), 1.0)
    np.testing.assert_allclose(np.asarray(change), np.sum(phi(new) - phi(old), axis=(-2, -1)), rtol=1e-5)
    # φ′(I) = (I − y) / max(I, f): the Poisson residuals' Jᵀr for J = ∂I
    t = 1e-3
    step = gn.floored_poisson_change(old + t, old, y, jnp.ones((2, 3)), 1.0)
    slope = np.sum(np.asarray((old - y) / jnp.maximum(old, floor)), axis=(-2, -1))
    np.testing.assert_allclose(np.asarray(step) / t, slope, rtol=2e-2)


def test_nuisance_diagonal_estimates_the_diagonal_of_the_nuisance_information():
    residual_fn, x, theta, idx, w = _toy()

    def flat(v):
        return jnp.concatenate([residual_fn({"a": v[:5], "b": v[5:]}, theta, i).ravel() for i in idx])

    jac = np.asarray(jax.jacfwd(flat)(jnp.concatenate([x["a"], x["b"]])), np.float64)
    diag = fit.nuisance_diagonal(residual_fn, x, theta, idx, w, probes=4000)
    exact = np.sum(jac**2, axis=0)
    np.testing.assert_allclose(np.concatenate([np.asarray(diag["a"]), np.asarray(diag["b"])]), exact, rtol=0.15)


def test_tapered_probe_makes_the_patterns_continuous_where_a_window_steps_a_pixel():
    """Without the taper the probe's edge column wraps around when the window steps (recon.forward)."""
    n, dk = 32, 0.1
    dx = 1.0 / (n * dk)
    probe = physics.probe_from_aberrations(n, dk, 80e3, 21.0, -100.0, {"C12": 20.0, "phi12": 30.0})
    tapered = physics.taper_probe(probe, 4.0)
    assert float(jnp.sum(jnp.abs(tapered) ** 2)) == pytest.approx(float(jnp.sum(jnp.abs(probe) ** 2)), rel=1e-5)
    assert float(jnp.max(jnp.abs(tapered[0]))) == 0.0 and float(jnp.max(jnp.abs(tapered[:, -1]))) == 0.0
    rng = np.random.default_rng(0)
    obj = jnp.asarray(np.exp(1j * rng.uniform(-1, 1, (1, 64, 64))), jnp.complex64)
    prop = jnp.ones((n, n), jnp.complex64)
    boundary = (20 + n / 2) * dx  # the window's top-left pixel steps from 19 to 20 here
    at = jnp.asarray([[boundary - 1e-4, 30.3], [boundary + 1e-4, 30.3]], jnp.float32)

    def jump(p):
        i = forward.predict_intensities(obj, p[None], at, jnp.zeros(2), dx, prop)
        return float(jnp.sum(jnp.abs(i[1] - i[0])) / jnp.sum(i[0]))

    assert jump(probe) > 1e-2
    assert jump(tapered) < 1e-3


def test_with_fitted_replaces_the_fitted_settings(tiny_plan_dict):
    plan = plan_from_dict(apply_overrides(tiny_plan_dict, {"probe.fit": ["defocus_A", "C12_A", "phi12_deg"],
                                                           "scan.fit": ["rotation_deg"], "probe.defocus_A": -90.0,
                                                           "probe.aberrations.C12_A": 5.0}))
    low = recon.lower.lower(plan, recon.load_dataset(plan.data))
    assert low.static.fit == ("probe.defocus_A", "probe.aberrations.C12_A", "probe.aberrations.phi12_deg",
                              "scan.rotation_deg")
    theta = fit.initial_values(low.settings, low.static.fit)
    np.testing.assert_allclose(np.asarray(theta), [-90.0, 5.0, 0.0, 0.0])
    s = fit.with_fitted(low.settings, low.static.fit, jnp.asarray([-50.0, 7.0, 30.0, 2.0]))
    assert float(s.defocus_A) == -50 and float(s.aberrations.C12) == 7 and float(s.aberrations.phi12) == 30
    assert float(s.rotation_deg) == 2 and float(s.aberrations.C30) == float(low.settings.aberrations.C30)


def _fit(tmp_path, seed, iterations, spec=SMALL, dose=1e4):
    clean, positions = calibration.clean_patterns(spec)
    data = calibration.write_realisation(tmp_path, clean, positions, dose * spec.scan_step_A**2, seed)
    plan = plan_from_dict(calibration.fit_plan(data, "gauss_newton", iterations, spec))
    return recon.reconstruct(plan)


@pytest.mark.slow  # subprocess CLI runs / a fit of 60 iterations
def test_fitted_optics_approach_the_truth_and_are_saved(tmp_path):
    result = _fit(tmp_path, seed=0, iterations=30)
    assert set(result.fitted) == set(calibration.TRUTH) == set(result.fitted_stderr)
    for key, true in calibration.TRUTH.items():
        start, value, sigma = calibration.START[key], result.fitted[key], result.fitted_stderr[key]
        assert 0 < sigma < abs(start - true) / 2, key
        assert abs(value - true) < 3.5 * sigma, key
    loaded = recon.load_result(result.save(tmp_path / "r.h5"))
    assert loaded.fitted == pytest.approx(result.fitted) and loaded.fitted_stderr == pytest.approx(result.fitted_stderr)
    plain = plan_from_dict(apply_overrides(result.plan.model_dump(mode="json"),
                                           {"iterations": 1, "probe.fit": [], "scan.fit": []}))
    assert recon.load_result(recon.reconstruct(plain).save(tmp_path / "plain.h5")).fitted == {}


@pytest.fixture(scope="module")
def calibration_fits(tmp_path_factory):
    """20 noise realisations at 1e5 e/Å² fitted as `benchmarks/fisher_calibration.py --dose 1e5` does
    (about 5 minutes on 2 cores)."""
    tmp = tmp_path_factory.mktemp("calibration")
    fits = [_fit(tmp, seed, 60, calibration.SPEC, dose=1e5) for seed in range(20)]
    return calibration.coverage([{"fitted": r.fitted, "fitted_stderr": r.fitted_stderr} for r in fits])


@pytest.mark.slow
@pytest.mark.parametrize("key, bound", [("probe.defocus_A", 0.9), ("probe.aberrations.C12_A", 0.85),
                                        ("scan.rotation_deg", 0.85)])
def test_two_sigma_coverage_over_noise_realisations(calibration_fits, key, bound):
    # measured 1.00 / 0.90 / 0.90 (README, Fitted optics; the goal is 0.9). For C12 and rotation the bound
    # leaves one fit for float differences between CPUs: seed 4's rotation ends at 1.98σ.
    assert calibration_fits[key]["coverage_2sigma"] >= bound, calibration_fits[key]
