"""Synthetic ptychography datasets with known ground truth, in the native HDF5 layout.

A 2D lattice of atom columns (hexagonal like MoS2 [001] or square like SrTiO3 [001]) fills a
periodic square cell sampled at the reconstruction pixel dx = 1/(N·dk). Every slice holds the
same layer of atoms (at the middle of the slice), so the crystal is `slices` layers thick.

Projected potential of one atom of atomic number Z, in V·Å (r in Å):

    v_Z(r) = W(Z) · Σ_i f_i · exp(−r²/(2 s_i²)) / (2π s_i²),   W(Z) = 37.1 · Z^0.707  V·Å²

with f = (0.112, 0.340, 0.548) and s = (0.093, 0.277, 0.684) Å: three normalised Gaussians
fitted to the Lobato IAM potentials of Mo, S, Sr, Ti and O in the shared datasets (NRMSE 5–7 % on
the band-limited projected potentials). It is evaluated analytically in Fourier space on the
cell, which is exact band-limited sampling (no aliasing, no supersampling needed).

Patterns come from the engine's forward model (`recon.forward.predict_patterns`, propagators
band-limited to 2/3 of Nyquist) with the engine's probe (`recon.physics.probe_from_aberrations`,
soft aperture edge 0.5 px, C10 = −defocus_A and any other Krivanek aberration of
`spec.aberrations`) on the transmission exp(iσV). The transmission itself is not
band-limited, exactly as in the engine: like the shared abTEM data (simulated on a much finer
grid), the patterns then carry the object's frequencies up to the grid's Nyquist, which the
ground truth holds too. Clean patterns are the
fraction of the incident beam per pixel; noisy ones are Poisson counts with dose·step² incident
electrons per pattern, dose i drawn from numpy default_rng([seed, i]).

Hard cases of real data:
* Scan rotation: the probe visits the grid rotated by `scan_rotation_deg` about its centroid
  (counter-clockwise in the (y, x) frame, the engine's `scan.rotation_deg` convention), while the
  file's `/scan/positions_yx_A` holds the nominal, unrotated grid (what the scan coils were told);
  the true positions are in `/scan/true_positions_yx_A`.
* Partial spatial coherence: a finite source, demagnified onto the specimen, is an incoherent
  ensemble of probes displaced by the source's intensity distribution. The recorded pattern at
  scan position r is then I(k; r) = ∫ S(d) I_coh(k; r + d) d²d: the coherent 4D dataset convolved
  over the scan coordinates with the source (the standard model, equivalent to blurring the 4D
  data in real space, not the patterns in k). For a Gaussian source of FWHM `source_fwhm_A` the
  integral is a Gauss–Hermite quadrature over SOURCE_QUADRATURE_POINTS² probe positions per
  pattern, so it does not depend on the scan step (blurring the measured grid would be aliased
  when the step exceeds the source size); on a 0.05 Å scan it matches the blurred coherent data
  (tests/test_simulate_hard.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.polynomial.hermite import hermgauss

from .plan import Aberrations, PlanError, SimulationSpec

POTENTIAL_SCALE_VA2 = 37.1        # W(Z) = POTENTIAL_SCALE_VA2 · Z**POTENTIAL_Z_EXPONENT, in V·Å²
POTENTIAL_Z_EXPONENT = 0.707
GAUSS_FRACTIONS = (0.112, 0.340, 0.548)
GAUSS_WIDTHS_A = (0.093, 0.277, 0.684)
APERTURE_EDGE_PX = 0.5
MARGIN_PX = 4                     # cell pixels beyond scan field ± half a window, on every side
CELL_SEARCH_PX = 64               # cell sizes tried above the minimum, for the smallest strain
SOURCE_QUADRATURE_POINTS = 7      # Gauss–Hermite nodes per axis averaging over the source
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

# Basis sites of the orthogonal cell, in fractions (y, x). Entry i of atom_Z occupies site i.
# hexagonal: honeycomb (A, B) in a (a√3 × a) cell, two of each per cell;
# square: corner, centre, edge (½, 0), edge (0, ½) of an a × a cell (Sr, Ti, O, O in SrTiO3 [001]).
LATTICES: dict[str, tuple[tuple[float, float], tuple[tuple[tuple[float, float], ...], ...]]] = {
    "hexagonal": ((np.sqrt(3.0), 1.0), (((0.0, 0.0), (0.5, 0.5)), ((1 / 6, 0.5), (2 / 3, 0.0)))),
    "square": ((1.0, 1.0), (((0.0, 0.0),), ((0.5, 0.5),), ((0.5, 0.0),), ((0.0, 0.5),))),
}


@dataclass(frozen=True, eq=False)
class SimulatedData:
    """A simulated dataset in memory; arrays are laid out as in the file (DC-centred patterns)."""

    spec: SimulationSpec
    dp: np.ndarray                   # float32 (sy, sx, N, N) clean, fraction of the beam, DC at [N/2, N/2]
    dp_noisy: dict[str, np.ndarray]  # "dose_1e+05" → float32 counts (sy, sx, N, N), DC-centred
    positions_yx_A: np.ndarray       # float64 (n, 2) nominal grid, raster order, ground-truth frame
    true_positions_yx_A: np.ndarray  # float64 (n, 2) where the probe was: the grid rotated by scan_rotation_deg
    y_A: np.ndarray                  # float64 (sy,) scan axes
    x_A: np.ndarray                  # float64 (sx,)
    V_slices: np.ndarray             # float32 (S, M, M) projected potential per slice, V·Å
    slice_z_limits_A: np.ndarray     # float64 (S, 2) entrance and exit z of each slice
    psi_ideal: np.ndarray            # complex64 (N, N) probe used, centred at [N/2, N/2], Σ|ψ|² = 1
    atom_positions_xyz_A: np.ndarray  # float64 (n_atoms, 3), columns (x, y, z) as in the shared files
    atom_numbers: np.ndarray         # int64 (n_atoms,)
    attrs: dict[str, Any]            # root attributes of the file

    @property
    def dx_A(self) -> float:
        return float(self.attrs["dx_A"])

    @property
    def V_sum(self) -> np.ndarray:
        return self.V_slices.sum(axis=0)

    @property
    def phase_sum(self) -> np.ndarray:
        return (self.attrs["sigma_rad_per_VA"] * self.V_sum).astype(np.float32)

    def default_patterns(self) -> tuple[str, np.ndarray]:
        """What `load_dataset` uses: the first noisy dose, or the clean patterns if none."""
        if self.dp_noisy:
            name = next(iter(self.dp_noisy))
            return f"dp_noisy/{name}", self.dp_noisy[name]
        return "dp", self.dp

    def metadata(self) -> dict[str, float | None]:
        """The values `recon.data` reads from a file's attributes."""
        return {k: float(self.attrs[k]) for k in
                ("energy_eV", "semiangle_mrad", "defocus_A", "dk_invA", "total_thickness_A")}


# --------------------------------------------------------------------------- lattice and potential
def unit_cell(lattice: str, lattice_constant_A: float, n_species: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Orthogonal cell (height, width) in Å and, per species, its site positions (k, 2) (y, x) in Å."""
    shape, sites = LATTICES[lattice]
    if not 1 <= n_species <= len(sites):
        raise PlanError(f"simulate.atom_Z: the {lattice} lattice has {len(sites)} sites, "
                        f"give 1 … {len(sites)} atomic numbers (got {n_species})")
    cell = lattice_constant_A * np.asarray(shape)
    return cell, [np.asarray(s) * cell for s in sites[:n_species]]


def commensurate_cell_px(cell_A: np.ndarray, dx_A: float, min_px: int) -> int:
    """Even cell size M ≥ min_px whose side M·dx holds whole lattice cells with the least strain."""
    start = min_px + min_px % 2
    sizes = np.arange(start, start + CELL_SEARCH_PX + 1, 2)
    strains = [np.abs(cell_strain(cell_A, m * dx_A)).max() for m in sizes]
    return int(sizes[int(np.argmin(strains))])


def cell_strain(cell_A: np.ndarray, side_A: float) -> np.ndarray:
    """Strain (y, x) that makes a whole number of lattice cells fit a square of `side_A`."""
    reps = np.maximum(1, np.round(side_A / cell_A))
    return side_A / (reps * cell_A) - 1.0


def atom_columns(cell_A: np.ndarray, sites_A: list[np.ndarray], side_A: float,
                 centre_yx_A: np.ndarray) -> list[np.ndarray]:
    """Per species, column positions (k, 2) in Å tiling the periodic square; site 0 at the centre."""
    reps = np.maximum(1, np.round(side_A / cell_A)).astype(int)
    strained = side_A / reps
    iy, ix = np.meshgrid(np.arange(reps[0]), np.arange(reps[1]), indexing="ij")
    corners = np.stack([iy.ravel(), ix.ravel()], axis=1) * strained
    scale = strained / cell_A
    shift = centre_yx_A - sites_A[0][0] * scale
    return [np.mod((corners[:, None, :] + (s * scale)[None]).reshape(-1, 2) + shift, side_A) for s in sites_A]


def atom_weight_VA2(Z: int) -> float:
    """Integrated projected potential W(Z) of one atom, V·Å²."""
    return POTENTIAL_SCALE_VA2 * float(Z) ** POTENTIAL_Z_EXPONENT


def projected_potential(columns_yx_A: list[np.ndarray], atom_Z: tuple[int, ...], n_px: int, dx_A: float) -> np.ndarray:
    """Projected potential (M, M) in V·Å of one layer on the periodic grid, band-limited at Nyquist."""
    k = np.fft.fftfreq(n_px, dx_A)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    spectrum = np.zeros((n_px, n_px), dtype=np.complex128)
    for pos, Z in zip(columns_yx_A, atom_Z):
        form = atom_weight_VA2(Z) * sum(f * np.exp(-2 * np.pi**2 * s**2 * k2)
                                        for f, s in zip(GAUSS_FRACTIONS, GAUSS_WIDTHS_A))
        ey = np.exp(-2j * np.pi * np.outer(pos[:, 0], k))
        ex = np.exp(-2j * np.pi * np.outer(pos[:, 1], k))
        spectrum += form * (ey.T @ ex)
    area_A2 = (n_px * dx_A) ** 2
    return np.fft.ifft2(spectrum).real * n_px**2 / area_A2


def scan_grid(scan_shape: tuple[int, int], step_A: float, side_A: float) -> tuple[np.ndarray, np.ndarray]:
    """Scan axes (y, x) with position (ny//2, nx//2) at the cell centre, like the shared files."""
    y = side_A / 2 + (np.arange(scan_shape[0]) - scan_shape[0] // 2) * step_A
    x = side_A / 2 + (np.arange(scan_shape[1]) - scan_shape[1] // 2) * step_A
    return y, x


def grid_positions(y_A: np.ndarray, x_A: np.ndarray) -> np.ndarray:
    """Positions (ny·nx, 2) (y, x) of the grid of axes y_A × x_A, raster order (x fastest)."""
    return np.stack(np.meshgrid(y_A, x_A, indexing="ij"), axis=-1).reshape(-1, 2)


def rotate_about_centroid(positions_yx_A: np.ndarray, rotation_deg: float) -> np.ndarray:
    """Positions (n, 2) rotated counter-clockwise in the (y, x) frame about their centroid,
    as the engine applies `scan.rotation_deg`: (y, x) → (y cos θ − x sin θ, y sin θ + x cos θ)."""
    c = positions_yx_A.mean(axis=0)
    t = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return c + (positions_yx_A - c) @ rot.T


def source_offsets(fwhm_A: float, points: int = SOURCE_QUADRATURE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Probe displacements (q, 2) in Å and weights (q,) summing to 1 that average over a round
    Gaussian source of FWHM `fwhm_A` (product Gauss–Hermite rule); one zero offset for a point source."""
    if fwhm_A <= 0:
        return np.zeros((1, 2)), np.ones(1)
    nodes, weights = hermgauss(points)
    d = np.sqrt(2.0) * fwhm_A / FWHM_PER_SIGMA * nodes
    w = weights / weights.sum()
    dy, dx = np.meshgrid(d, d, indexing="ij")
    return np.stack([dy.ravel(), dx.ravel()], axis=1), np.outer(w, w).ravel()


def aberration_values(aberrations: Aberrations) -> dict[str, float]:
    """{"C12": Å, "phi12": degrees, ...}: the keys `physics.probe_from_aberrations` reads."""
    return {k.removesuffix("_A").removesuffix("_deg"): float(v) for k, v in aberrations.model_dump().items()}


def min_cell_px(reach_A: float, n_px: int, dx_A: float) -> int:
    """Smallest cell with more than half a window (plus MARGIN_PX) beyond every probe position
    on every side; `reach_A` is the largest |y| or |x| of a position from the cell centre."""
    return int(np.ceil(2 * (reach_A / dx_A + n_px / 2 + MARGIN_PX)))


def dose_name(dose: float) -> str:
    return f"dose_{dose:.0e}"


# --------------------------------------------------------------------------- simulation
def simulate(spec: SimulationSpec) -> SimulatedData:
    """Simulate the dataset described by `spec`; deterministic for a given spec (and seed)."""
    from .forward import predict_patterns
    from .physics import probe_from_aberrations, sigma_rad_per_VA, wavelength_A

    names = _check_doses(spec.dose_e_per_A2)
    if min(spec.scan_shape) < 1:
        raise PlanError(f"simulate.scan_shape: needs at least 1 × 1 positions, got {list(spec.scan_shape)}")
    if any(z < 1 for z in spec.atom_Z):
        raise PlanError(f"simulate.atom_Z: atomic numbers must be ≥ 1, got {list(spec.atom_Z)}")
    n = spec.pattern_px
    dx = 1.0 / (n * spec.dk_invA)
    cell, sites = unit_cell(spec.lattice, spec.lattice_constant_A, len(spec.atom_Z))
    jitter, weights = source_offsets(spec.source_fwhm_A)
    centred = rotate_about_centroid(grid_positions(*scan_grid(spec.scan_shape, spec.scan_step_A, 0.0)),
                                    spec.scan_rotation_deg)
    reach = float((np.abs(centred).max(axis=0) + np.abs(jitter).max(axis=0)).max())
    m = commensurate_cell_px(cell, dx, min_cell_px(reach, n, dx))
    side = m * dx
    columns = atom_columns(cell, sites, side, np.array([side / 2, side / 2]))
    layer = projected_potential(columns, spec.atom_Z, m, dx)
    V_slices = np.repeat(layer[None].astype(np.float32), spec.slices, axis=0)
    sigma = float(sigma_rad_per_VA(spec.energy_eV))

    transmission = np.repeat(np.exp(1j * sigma * layer)[None].astype(np.complex64), spec.slices, axis=0)
    probe = np.asarray(probe_from_aberrations(n, spec.dk_invA, spec.energy_eV, spec.semiangle_mrad,
                                              spec.defocus_A, aberration_values(spec.aberrations),
                                              aperture_edge_px=APERTURE_EDGE_PX))
    y_A, x_A = scan_grid(spec.scan_shape, spec.scan_step_A, side)
    positions = grid_positions(y_A, x_A)
    true_positions = rotate_about_centroid(positions, spec.scan_rotation_deg)
    clean = sum(w * predict_patterns(transmission, probe[None], true_positions + d, np.zeros(2), dx,
                                     spec.energy_eV, spec.slice_thickness_A)
                for d, w in zip(jitter, weights))
    dp = np.fft.fftshift(clean, axes=(-2, -1)).reshape(*spec.scan_shape, n, n).astype(np.float32)
    incident = [d * spec.scan_step_A**2 for d in spec.dose_e_per_A2]
    noisy = {name: np.random.default_rng([spec.seed, i]).poisson(dp.astype(np.float64) * e).astype(np.float32)
             for i, (name, e) in enumerate(zip(names, incident))}

    z0 = np.arange(spec.slices) * spec.slice_thickness_A
    limits = np.stack([z0, z0 + spec.slice_thickness_A], axis=1)
    atoms_xyz, atoms_Z = _atom_table(columns, spec.atom_Z, z0 + spec.slice_thickness_A / 2)
    attrs = _root_attrs(spec, dx, m, side, sigma, float(wavelength_A(spec.energy_eV)), cell, y_A, x_A)
    return SimulatedData(spec, dp, noisy, positions, true_positions, y_A, x_A, V_slices, limits,
                         probe.astype(np.complex64), atoms_xyz, atoms_Z, attrs)


def _check_doses(doses: tuple[float, ...]) -> list[str]:
    if any(not np.isfinite(d) or d <= 0 for d in doses):
        raise PlanError(f"simulate.dose_e_per_A2: doses must be > 0 e/Å², got {list(doses)}")
    names = [dose_name(d) for d in doses]
    if len(set(names)) != len(names):
        raise PlanError(f"simulate.dose_e_per_A2: {list(doses)} give repeated dataset names {names}; "
                        f"use doses that differ in the first digit or exponent")
    return names


def _atom_table(columns: list[np.ndarray], atom_Z: tuple[int, ...], z_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Atoms (x, y, z) and atomic numbers of every layer."""
    xyz, numbers = [], []
    for z in z_A:
        for pos, Z in zip(columns, atom_Z):
            xyz.append(np.column_stack([pos[:, 1], pos[:, 0], np.full(len(pos), z)]))
            numbers.append(np.full(len(pos), Z, dtype=np.int64))
    return np.concatenate(xyz), np.concatenate(numbers)


def _root_attrs(spec: SimulationSpec, dx: float, m: int, side: float, sigma: float, lam: float,
                cell: np.ndarray, y_A: np.ndarray, x_A: np.ndarray) -> dict[str, Any]:
    strain = cell_strain(cell, side)
    n = spec.pattern_px
    return {
        "dataset": "simulated",
        "generator": "recon.simulate",
        "description": (f"{spec.lattice} lattice a = {spec.lattice_constant_A} Å, Z = {list(spec.atom_Z)}, "
                        f"{spec.slices} slices of {spec.slice_thickness_A} Å, seed {spec.seed}"),
        "potential": ("sum of 3 Gaussians per atom, W(Z) = %.1f Z^%.3f V·Å², fractions %s, widths %s Å; "
                      "analytic Fourier series on the periodic cell (band-limited at Nyquist)"
                      % (POTENTIAL_SCALE_VA2, POTENTIAL_Z_EXPONENT, GAUSS_FRACTIONS, GAUSS_WIDTHS_A)),
        "simulation_spec_json": spec.model_dump_json(),
        "energy_eV": float(spec.energy_eV),
        "wavelength_A": lam,
        "sigma_rad_per_VA": sigma,
        "semiangle_mrad": float(spec.semiangle_mrad),
        "defocus_A": float(spec.defocus_A),
        "C10_A": -float(spec.defocus_A),
        "aperture_edge_px": APERTURE_EDGE_PX,
        "dk_invA": float(spec.dk_invA),
        "dk_mrad": float(spec.dk_invA * lam * 1e3),
        "dx_A": dx,
        "n_pix": n,
        "window_A": n * dx,
        "dc_pixel_index": np.array([n // 2, n // 2]),
        "bf_radius_px": float(spec.semiangle_mrad * 1e-3 / (lam * spec.dk_invA)),
        "n_slices": spec.slices,
        "slice_thickness_A": float(spec.slice_thickness_A),
        "total_thickness_A": float(spec.slices * spec.slice_thickness_A),
        "scan_shape_yx": np.array(spec.scan_shape),
        "scan_step_A": float(spec.scan_step_A),
        "scan_origin_yx_A": np.array([y_A[0], x_A[0]]),
        "scan_rotation_deg": float(spec.scan_rotation_deg),
        "source_fwhm_A": float(spec.source_fwhm_A),
        "source_quadrature_points": SOURCE_QUADRATURE_POINTS if spec.source_fwhm_A > 0 else 1,
        **{k: float(v) for k, v in spec.aberrations.model_dump().items()},
        "doses_e_per_A2": np.array(spec.dose_e_per_A2, dtype=np.float64),
        "noise_seed": spec.seed,
        "gt_pixels": m,
        "sim_cell_A": side,
        "ground_truth_periodic": True,
        "lattice": spec.lattice,
        "lattice_constant_A": float(spec.lattice_constant_A),
        "atom_Z": np.array(spec.atom_Z, dtype=np.int64),
        "strain_y": float(strain[0]),
        "strain_x": float(strain[1]),
    }


# --------------------------------------------------------------------------- writing
def write_dataset(spec_or_data: SimulationSpec | SimulatedData, path: str | Path) -> Path:
    """Write a simulated dataset (simulating it first if given a spec) in the native layout."""
    data = simulate(spec_or_data) if isinstance(spec_or_data, SimulationSpec) else spec_or_data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = data.spec.scan_step_A
    with h5py.File(path, "w") as f:
        f.attrs.update(data.attrs)
        f.create_dataset("dp", data=data.dp).attrs.update(
            {"shape_meaning": "(scan_y, scan_x, ky, kx)", "units": "fraction of incident beam per pixel (noise free)"})
        for i, (name, counts) in enumerate(data.dp_noisy.items()):
            dose = data.spec.dose_e_per_A2[i]
            f.create_dataset(f"dp_noisy/{name}", data=counts).attrs.update(
                {"dose_e_per_A2": dose, "incident_e_per_pattern": dose * step**2, "seed": data.spec.seed,
                 "rng": f"numpy default_rng([seed, {i}])", "units": "electron counts (Poisson draw of dp * dose * step^2)"})
        scan = f.create_group("scan")
        scan.create_dataset("positions_yx_A", data=data.positions_yx_A).attrs["meaning"] = (
            "nominal grid; the probe visited true_positions_yx_A (rotated by scan_rotation_deg)")
        scan.create_dataset("true_positions_yx_A", data=data.true_positions_yx_A)
        scan.create_dataset("positions_yx_px", data=data.positions_yx_A / data.dx_A)
        scan.create_dataset("y_A", data=data.y_A)
        scan.create_dataset("x_A", data=data.x_A)
        probe = f.create_group("probe")
        probe.create_dataset("psi_ideal", data=data.psi_ideal)
        vacuum = np.abs(np.fft.fft2(np.fft.ifftshift(data.psi_ideal), norm="ortho")) ** 2
        probe.create_dataset("dp_vacuum", data=np.fft.fftshift(vacuum).astype(np.float32))
        gt = f.create_group("ground_truth")
        gt.attrs.update({"dx_A": data.dx_A, "sigma_rad_per_VA": data.attrs["sigma_rad_per_VA"],
                         "ground_truth_periodic": True,
                         "meaning": "V_slices (n_slices, y, x) projected potential per slice [V*A] at dx_A; "
                                    "pixel [i, j] at (y, x) = (i, j)*dx_A; periodic"})
        gt.create_dataset("V_slices", data=data.V_slices)
        gt.create_dataset("V_sum", data=data.V_sum)
        gt.create_dataset("phase_sum", data=data.phase_sum)
        gt.create_dataset("slice_z_limits_A", data=data.slice_z_limits_A)
        gt.create_dataset("atom_positions_xyz_A", data=data.atom_positions_xyz_A)
        gt.create_dataset("atom_numbers", data=data.atom_numbers)
    return path
