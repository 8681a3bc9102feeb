"""Fitted optics: aberrations and scan rotation as variables of the reconstruction, with errors.

`probe.fit` / `scan.fit` name plan values (defocus_A, C12_A, phi12_deg, ..., rotation_deg) that
become variables θ (P,) in plan units, carried in `EngineState.fitted`. The probe is then the
aberration-parameterised one (`physics.probe_from_aberrations` of θ; its free pixels are not
updated) and the positions are rotated by the fitted angle. There is no free-pixel probe stage:
the parameterised probe is used from the first iteration (free pixels would absorb the aberrations
the fit is meant to measure).

After each iteration's object pass (from iteration `engine.fit_start`, so that the object has formed
with the starting optics), θ and the object x take one joint Gauss-Newton (Levenberg-Marquardt) step
over all fitted positions, with x eliminated (`reduce_system`, `joint_step`): P + 1 matrix-free CG
solves with F_xx (`engine.fit_cg_iterations`) give the Schur complement S = F_θθ − F_θx F_xx⁻¹ F_xθ,
the reduced gradient g̃ = g_θ − F_θx F_xx⁻¹ g_x and x's linear response Z = F_xx⁻¹ F_xθ; θ steps by
(S + λ diag S) δ = −g̃ and x by its own damped step −(F_xx + λ D)⁻¹ g_x minus Z δ (one more CG solve).
With J_θᵀJ_θ alone (the object held fixed) the alternation crawls along the valley where the object
compensates a wrong θ (measured: 15 Å of defocus error not removed in 80 iterations). The elimination
behind S, g̃ and Z is ridged by the fixed STEP_RIDGE × D, not by λ: damping the object's response by λ
overstates S and shrinks θ's steps (measured on the calibration data: the rotation crawled by ~0.01° per
iteration). x's own step keeps λ: undamped it is wild in the weakly illuminated pixels and every joint
step was rejected; without it the object converged far more slowly (the Poisson data term of one
calibration fit after 200 iterations was ~160 log-likelihood units higher). J = ∂r/∂θ of the noise
model's whitened residuals (`gauss_newton.residuals`, `jax.linearize`). The step is kept only if the data
term decreases (`gauss_newton.loss_change`; for Poisson noise `gauss_newton.floored_poisson_change`, the
likelihood the Fisher-scoring step descends).

With `probe.fit_taper_px` > 0 the parameterised probe is tapered to zero at its window's edge
(`physics.taper_probe`). A probe that reaches the edge makes the model jump where a position's window
steps by a pixel; every step across such a jump is rejected and λ grows until θ stops (measured on the
calibration data: fits stopped at 3.185° of rotation, true 3°, in 8 of 40 realisations). The taper
removes the jumps but, where the real probe does reach the edge, biases the fit (measured on mos2_1l:
defocus −98.2 ± 0.2 Å tapered by 4 px, −100.0 ± 0.2 Å without; truth −100), so it is off by default.

Standard errors: the Fisher information at the solution, F = JᵀJ / s², with s² the whitened
residual's variance (`gauss_newton.RESIDUAL_VARIANCE`: Poisson 1, so F = Σ (∂μ/∂θ)²/μ; amplitude
and Anscombe ¼; intensity estimated as Σ r² / (n − P)). The object (and the probe pixels, when no
probe optic is fitted) are nuisance parameters correlated with θ, so θ's information is the Schur
complement S (`reduce_system` with SCHUR_CG_ITERATIONS CG iterations, run together under vmap);
σ_i = √((S⁻¹)_ii). CG from zero underestimates F_xx⁻¹ when stopped early (σ too small); preconditioned
by the estimated diagonal of F_xx (`nuisance_diagonal`) it has converged: on the calibration data σ is
the same to 4 digits after 30 and 1000 iterations (one curvature per group gave σ 1–3 % low after 100).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .gauss_newton import RESIDUAL_VARIANCE, conjugate_gradients
from .state import Settings

SCHUR_CG_ITERATIONS = 100
#: Relative ridge of the object's elimination in the fitting step.
STEP_RIDGE = 1e-4
#: Random probes estimating diag F_xx (the CG preconditioner), and its floor relative to the largest entry.
DIAGONAL_PROBES = 16
DIAGONAL_FLOOR = 1e-8


class NormalEquations(NamedTuple):
    """A = JᵀJ (P, P), g = Jᵀr (P,), rss = Σ r² (), n = residuals counted () (positions × N², mask ignored)."""

    A: jnp.ndarray
    g: jnp.ndarray
    rss: jnp.ndarray
    n: jnp.ndarray


def fits_probe(keys: tuple[str, ...]) -> bool:
    """True when any fitted value is a probe optic (the probe is then parameterised)."""
    return any(k.startswith("probe.") for k in keys)


def _aberration_field(key: str) -> str:
    """probe.aberrations.C12_A -> C12; probe.aberrations.phi12_deg -> phi12."""
    return key.rsplit(".", 1)[1].removesuffix("_A").removesuffix("_deg")


def initial_values(settings: Settings, keys: tuple[str, ...]):
    """θ (P,) f32: the settings' values of the fitted keys."""
    def one(key):
        if key == "probe.defocus_A":
            return settings.defocus_A
        if key == "scan.rotation_deg":
            return settings.rotation_deg
        return getattr(settings.aberrations, _aberration_field(key))

    return jnp.stack([jnp.asarray(one(k), jnp.float32) for k in keys]) if keys else jnp.zeros((0,), jnp.float32)


def with_fitted(settings: Settings, keys: tuple[str, ...], values) -> Settings:
    """The settings with each fitted key replaced by its value in θ (P,)."""
    if not keys:
        return settings
    ab = settings.aberrations._replace(**{_aberration_field(k): values[i] for i, k in enumerate(keys)
                                          if k.startswith("probe.aberrations.")})
    top = {k.split(".")[1]: values[i] for i, k in enumerate(keys) if k in ("probe.defocus_A", "scan.rotation_deg")}
    return settings._replace(aberrations=ab, **top)


def normal_equations(residual_fn: Callable, theta, batches, weights) -> NormalEquations:
    """Accumulate JᵀJ, Jᵀr and Σr² over mini-batches (n_batches, B) of positions with weights (0 = padding).

    residual_fn(theta, idx (B,)) -> whitened residuals (B, N, N); J by P forward-mode passes.
    """
    p = theta.shape[0]
    basis = jnp.eye(p, dtype=theta.dtype)

    def one(acc, batch):
        idx, w = batch
        r, jvp = jax.linearize(lambda t: residual_fn(t, idx), theta)
        scale = jnp.sqrt(w)[:, None, None]
        r = r * scale
        jac = jax.vmap(jvp)(basis) * scale  # (P, B, N, N)
        flat = jac.reshape(p, -1)
        return NormalEquations(acc.A + flat @ flat.T, acc.g + flat @ r.ravel(), acc.rss + jnp.sum(r**2),
                               acc.n + jnp.sum(w) * r.shape[-1] * r.shape[-2]), None

    zero = NormalEquations(jnp.zeros((p, p)), jnp.zeros((p,)), jnp.zeros(()), jnp.zeros(()))
    acc, _ = jax.lax.scan(one, zero, (batches, weights))
    return acc


def total_change(change_fn: Callable, batches, weights):
    """Σ over the mini-batches of change_fn(idx) -> (B,) per-pattern data-term changes, weighted."""
    def one(acc, batch):
        idx, w = batch
        return acc + jnp.sum(change_fn(idx) * w), None

    return jax.lax.scan(one, jnp.zeros(()), (batches, weights))[0]


def residual_variance(noise_model: str, ne: NormalEquations):
    """s² of the whitened residuals: fixed by the noise model, or estimated (intensity)."""
    fixed = RESIDUAL_VARIANCE[noise_model]
    if fixed is not None:
        return jnp.asarray(fixed, jnp.float32)
    return ne.rss / jnp.maximum(ne.n - ne.A.shape[0], 1.0)


def standard_errors(noise_model: str, ne: NormalEquations, information=None):
    """σ (P,): √ diag of the inverse Fisher information (information / s²; default A, θ alone)."""
    fisher = (ne.A if information is None else information) / residual_variance(noise_model, ne)
    return jnp.sqrt(jnp.diag(jnp.linalg.inv(fisher)))


def _weighted(residual_fn: Callable, idx, w):
    return lambda x, theta: residual_fn(x, theta, idx) * jnp.sqrt(w)[:, None, None]


def nuisance_gram(residual_fn: Callable, x: dict, theta, batches, weights) -> Callable:
    """v ↦ F_xx v = Σ_batches J_xᵀ J_x v (unscaled by s²) for residual_fn(x, θ, idx)."""
    def matvec(v):
        def one(acc, batch):
            f = _weighted(residual_fn, *batch)
            _, jvp = jax.linearize(lambda y: f(y, theta), x)
            back = jax.linear_transpose(jvp, x)(jvp(v))[0]
            return jax.tree_util.tree_map(jnp.add, acc, back), None

        return jax.lax.scan(one, jax.tree_util.tree_map(jnp.zeros_like, x), (batches, weights))[0]

    return matvec


def cross_columns(residual_fn: Callable, x: dict, theta, batches, weights):
    """F_xθ as P columns: a tree like x with a leading axis P (J_xᵀ J_θ e_i summed over batches)."""
    basis = jnp.eye(theta.shape[0], dtype=theta.dtype)
    zeros_x = jax.tree_util.tree_map(jnp.zeros_like, x)

    def one(acc, batch):
        f = _weighted(residual_fn, *batch)
        _, jvp = jax.linearize(f, x, theta)
        back = jax.linear_transpose(lambda v: jvp(v, jnp.zeros_like(theta)), zeros_x)
        cols = jax.vmap(lambda e: back(jvp(zeros_x, e))[0])(basis)
        return jax.tree_util.tree_map(jnp.add, acc, cols), None

    zero = jax.tree_util.tree_map(lambda a: jnp.zeros((theta.shape[0], *a.shape), a.dtype), x)
    return jax.lax.scan(one, zero, (batches, weights))[0]


def nuisance_gradient(residual_fn: Callable, x: dict, theta, batches, weights) -> dict:
    """g_x = Σ_batches J_xᵀ r (a tree like x)."""
    def one(acc, batch):
        f = _weighted(residual_fn, *batch)
        r, jvp = jax.linearize(lambda y: f(y, theta), x)
        return jax.tree_util.tree_map(jnp.add, acc, jax.linear_transpose(jvp, x)(r)[0]), None

    return jax.lax.scan(one, jax.tree_util.tree_map(jnp.zeros_like, x), (batches, weights))[0]


class Reduced(NamedTuple):
    """The joint Gauss-Newton system with the nuisance variables x eliminated.

    schur: S = A_θθ − F_θx F_xx⁻¹ F_xθ (P, P); gradient: g_θ − F_θx F_xx⁻¹ g_x (P,); response:
    Z = F_xx⁻¹ F_xθ (tree like x, leading axis P); x_step: x's own damped step −(F_xx + ρ_x D)⁻¹ g_x.
    """

    schur: jnp.ndarray
    gradient: jnp.ndarray
    response: dict
    x_step: dict


def nuisance_diagonal(residual_fn: Callable, x: dict, theta, batches, weights, probes: int = DIAGONAL_PROBES) -> dict:
    """diag F_xx (a tree like x), estimated as the mean of (J_xᵀ u)² over `probes` random sign vectors u in
    residual space (unbiased and never negative); the same probes for every call (a fixed key)."""
    def one(acc, batch):
        f = _weighted(residual_fn, *batch)
        r, vjp = jax.vjp(lambda y: f(y, theta), x)

        def probe(total, key):
            back = vjp(jax.random.rademacher(key, r.shape, r.dtype))[0]
            return jax.tree_util.tree_map(lambda a, b: a + b**2, total, back), None

        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), batch[0][0]), probes)
        return jax.lax.scan(probe, acc, keys)[0], None

    total = jax.lax.scan(one, jax.tree_util.tree_map(jnp.zeros_like, x), (batches, weights))[0]
    return jax.tree_util.tree_map(lambda a: a / probes, total)


def reduce_system(residual_fn: Callable, x: dict, theta, ne: NormalEquations, batches, weights,
                  iterations=SCHUR_CG_ITERATIONS, ridge=0.0, step_ridge=None) -> Reduced:
    """Eliminate x from the joint normal equations: P + 1 CG solves with F_xx + ρ D (under vmap), D the
    estimated diagonal of F_xx (`nuisance_diagonal`, floored at DIAGONAL_FLOOR × its largest entry; also
    the preconditioner: the object's pixels differ by orders of magnitude in illumination); ρ ≥ 1e-6.
    With `step_ridge` ρ_x, one more solve gives x's own step −(F_xx + ρ_x D)⁻¹ g_x (else zeros)."""
    matvec = nuisance_gram(residual_fn, x, theta, batches, weights)
    cols = cross_columns(residual_fn, x, theta, batches, weights)
    g_x = nuisance_gradient(residual_fn, x, theta, batches, weights)
    diag = nuisance_diagonal(residual_fn, x, theta, batches, weights)
    top = jnp.max(jnp.stack([jnp.max(v) for v in diag.values()]))
    diag = {k: jnp.maximum(v, DIAGONAL_FLOOR * top + 1e-30) for k, v in diag.items()}
    p = theta.shape[0]
    own = step_ridge is not None
    ridges = jnp.maximum(jnp.stack([jnp.asarray(ridge, jnp.float32)] * (p + 1)
                                   + ([jnp.asarray(step_ridge, jnp.float32)] if own else [])), 1e-6)
    rhs = jax.tree_util.tree_map(lambda c, g: jnp.concatenate([c] + [g[None]] * (1 + int(own))), cols, g_x)

    def solve(b, rho):
        damped = lambda v: {k: a + rho * diag[k] * v[k] for k, a in matvec(v).items()}  # noqa: E731
        return conjugate_gradients(damped, b, {k: (1.0 + rho) * v for k, v in diag.items()}, iterations)

    solved = jax.vmap(solve)(rhs, ridges)
    z = jax.tree_util.tree_map(lambda a: a[:p], solved)
    z_g = jax.tree_util.tree_map(lambda a: a[p], solved)
    x_step = jax.tree_util.tree_map(lambda a: -a[p + 1] if own else jnp.zeros_like(a[p]), solved)
    reduction = sum(jnp.einsum("p...,q...->pq", cols[k], z[k]) for k in x)
    coupling = sum(jnp.einsum("p...,...->p", cols[k], z_g[k]) for k in x)
    return Reduced(schur=ne.A - 0.5 * (reduction + reduction.T), gradient=ne.g - coupling, response=z,
                   x_step=x_step)


def joint_step(red: Reduced, theta, x: dict, damping):
    """The joint Gauss-Newton step with x eliminated, Marquardt damping on θ: θ + δ with (S + λ diag S) δ = −g̃,
    and x + x_step − Z δ (without damping and ridges, the dense joint step)."""
    diag = jnp.diag(red.schur)
    matrix = red.schur + jnp.diag(damping * diag + 1e-12 * (jnp.max(diag) + 1e-30))
    delta = -jnp.linalg.solve(matrix, red.gradient)
    return theta + delta, {k: v + red.x_step[k] - jnp.einsum("p,p...->...", delta, red.response[k])
                           for k, v in x.items()}
