"""How well the engine's forward model explains a dataset given its ground truth.

Usage: python benchmarks/model_mismatch.py DATA.h5 [--every 5] [--slices K]
Predicts the clean patterns `dp` from `ground_truth/V_slices` summed into K equal slices (multislice
with the default 2/3 band limit), with the nominal probe, and prints the Poisson data loss
(normalised as in recon.noise) for point-sampled (supersample 1) and pixel-integrated
(supersample 3) apertures, and their intensity on the aperture-edge ring relative to the data.
Compare with a reconstruction's final_data_loss: a reconstruction that ends above the truth's loss
is stuck, one below it is fitting what the model cannot represent.
"""
from __future__ import annotations

import argparse
import json

import h5py
import jax.numpy as jnp
import numpy as np

from recon import forward, noise, physics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--every", type=int, default=5, help="use every k-th scan position")
    parser.add_argument("--slices", type=int, default=1, help="slices the ground truth is summed into")
    args = parser.parse_args()
    with h5py.File(args.data) as f:
        a = dict(f.attrs)
        positions = f["scan/positions_yx_A"][()][:: args.every]
        n = f["dp"].shape[-1]
        dp = f["dp"][()].reshape(-1, n, n)[:: args.every]
        potential = f["ground_truth/V_slices"][()]
        limits = f["ground_truth/slice_z_limits_A"][()]
    groups = np.array_split(np.arange(len(potential)), args.slices)
    transmission = np.exp(1j * a["sigma_rad_per_VA"] * np.stack([potential[g].sum(0) for g in groups]))
    thickness_A = float(limits[-1, 1] - limits[0, 0]) / args.slices
    measured = np.fft.ifftshift(dp, axes=(-2, -1))
    total = float(measured.sum(axis=(-2, -1)).mean())
    f_px = np.fft.fftfreq(n) * n
    k_px = np.hypot(f_px[:, None], f_px[None, :])
    bf_px = a["semiangle_mrad"] * 1e-3 / float(physics.wavelength_A(a["energy_eV"])) / a["dk_invA"]
    ring = (k_px >= np.floor(bf_px)) & (k_px < np.floor(bf_px) + 1)
    for supersample in (1, 3):
        probe = physics.probe_from_aberrations(n, a["dk_invA"], a["energy_eV"], a["semiangle_mrad"], a["defocus_A"],
                                               supersample=supersample)
        model = forward.predict_patterns(transmission, np.asarray(probe)[None] * np.sqrt(total), positions,
                                         np.zeros(2), a["dx_A"], a["energy_eV"], thickness_A)
        loss = noise.pattern_losses("poisson", jnp.asarray(model), jnp.asarray(measured), jnp.ones((n, n)), 1e-6,
                                    total, total / n**2)
        print(json.dumps({"slices": args.slices, "aperture_supersample": supersample, "poisson_loss": round(float(loss.mean()), 5),
                          "edge_ring_intensity_ratio": round(float(model[:, ring].sum() / measured[:, ring].sum()), 3)}))


if __name__ == "__main__":
    main()
