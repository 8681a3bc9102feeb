"""The engine: compile once, results, resume, divergence, held-out positions, plan errors."""
import math

import numpy as np
import pytest

import recon
from recon import engine
from recon.plan import apply_overrides, plan_from_dict


def _float_variant(i: int) -> dict:
    """Plan overrides that change every floating-point setting (and schedule values) for variant i."""
    f = 1.0 + 0.03 * i
    return {
        "probe.energy_eV": 80_000.0 * f, "probe.semiangle_mrad": 21.0 * f, "probe.defocus_A": -100.0 * f,
        "probe.aperture_edge_px": 0.5 * f, "probe.main_mode_fraction": 0.8 / f, "probe.tilt_mrad": [0.1 * i, -0.1 * i],
        "probe.aberrations": {"C12_A": 5.0 * i, "phi12_deg": 10.0 * i, "C21_A": 50.0 * i, "phi21_deg": 5.0 * i,
                              "C23_A": 20.0 * i, "phi23_deg": 3.0 * i, "C30_A": 1e4 * i, "C32_A": 1e3 * i,
                              "phi32_deg": 7.0 * i, "C34_A": 1e3 * i, "phi34_deg": 2.0 * i, "C41_A": 1e4 * i,
                              "C43_A": 1e4 * i, "C45_A": 1e4 * i, "C50_A": 1e6 * i, "C52_A": 1e5 * i,
                              "C54_A": 1e5 * i, "C56_A": 1e5 * i},
        "detector.dk_invA": 0.1 * (1 + 0.01 * i), "scan.step_A": 0.6 * (1 + 0.02 * i),
        "scan.rotation_deg": 3.0 * i, "scan.affine": [1.0 + 0.01 * i, 0.01 * i, -0.01 * i, 1.0],
        "object.slice_thickness_A": 2.0 * f, "object.band_limit": 0.66 * f, "object.init_amplitude": 1.0 / f, "object.init_phase_rad": 0.01 * i,
        "noise_model.eps": 1e-6 * f,
        "optimizers.object": {"learning_rate": 0.02 * f, "start_iteration": i % 2, "schedule":
                              ["constant", "cosine", "exponential", "warmup_cosine", "cosine"][i],
                              "decay_rate": 0.95 * f if f < 1.05 else 0.95, "warmup_iterations": i,
                              "final_fraction": 0.1 * f},
        "optimizers.probe": {"learning_rate": 0.001 * f, "start_iteration": i % 3},
        "optimizers.positions": {"learning_rate": 0.01 * i, "start_iteration": 1},
        "regularizers": {"object_l1": 1e-4 * i, "object_l2": 1e-4 * i, "object_tikhonov": 1e-3 * i,
                         "object_tv": 1e-3 * i, "phase_l1": 1e-4 * i, "layer_tikhonov": 1e-3 * i,
                         "layer_tv": 1e-3 * i, "probe_l2": 1e-5 * i, "tv_eps": 1e-8 * f},
        "constraints": {
            "fix_probe_intensity": {"enabled": i % 2 == 0, "start": i, "step": 1 + i % 2},
            "orthogonalize_probe": {"enabled": True, "start": 0, "end": 2 + i},
            "object_amplitude": {"enabled": True, "min": 0.1 * i / 5, "max": 1.0 + 0.1 * i},
            "phase_positivity": {"enabled": i > 2, "relax": 0.2 * f},
            "lateral_lowpass": {"enabled": i % 2 == 1, "sigma_px": 0.3 * f},
            "z_blur": {"enabled": i > 1, "sigma_slices": 0.5 * f},
            "kz_filter": {"enabled": i > 0, "beta": 1.0 * f, "strength": 0.5},
            "phase_ramp_removal": {"enabled": i % 2 == 0},
            "probe_fourier_mask": {"enabled": i > 1, "radius_factor": 1.1 * f},
            "position_recentering": {"enabled": i != 3},
        },
    }


def test_plans_differing_in_every_float_setting_compile_once(tiny_plan_dict):
    base = {**tiny_plan_dict, "object": {"slices": 2}, "probe": {"modes": 2}, "iterations": 2}
    dataset = recon.load_dataset(plan_from_dict(base).data)
    before = engine.compile_count()
    probes = []
    for i in range(5):
        plan = plan_from_dict(apply_overrides(base, _float_variant(i)))
        result = recon.reconstruct(plan, dataset=dataset)
        assert result.iterations_done == 2
        probes.append(result.probe)
    # one program each for init, iteration and outputs, shared by all five plans
    assert engine.compile_count() - before == 3
    assert not np.allclose(probes[0], probes[1])


def test_reconstruction_reduces_loss_and_recovers_phase(tiny_data_path):
    plan = plan_from_dict({"iterations": 25, "batch_size": 16, "data": {"path": str(tiny_data_path)}})
    result = recon.reconstruct(plan)
    loss = result.history["loss"]
    assert loss[-1] < 0.2 * loss[0]
    assert not result.diverged and result.stop_reason == "completed"
    import h5py

    with h5py.File(tiny_data_path) as f:
        truth = f["ground_truth/phase_sum"][()]
    assert result.phase.std() > 0.3 * truth.std()
    assert len(result.history["time_s"]) == 25


def test_result_round_trip_and_resume(tmp_path, tiny_plan_dict):
    plan = plan_from_dict(tiny_plan_dict)
    result = recon.reconstruct(plan)
    path = result.save(tmp_path / "r.h5")
    loaded = recon.load_result(path)
    np.testing.assert_array_equal(loaded.object, result.object)
    assert loaded.origin_yx_A == result.origin_yx_A and loaded.dx_A == result.dx_A
    assert loaded.plan == plan
    import h5py

    with h5py.File(path) as f:
        assert f["object"].dtype == np.complex64 and f["object"].ndim == 3
        assert f["probe"].shape[0] == 1 and f["history/loss"].shape == (3,)
        assert "plan" in f.attrs and len(f.attrs["origin_yx_A"]) == 2
    longer = plan.model_copy(update={"iterations": 5})
    resumed = recon.reconstruct(longer, resume=loaded)
    assert resumed.iterations_done == 5 and len(resumed.history["loss"]) == 2
    assert resumed.history["loss"][0] <= result.history["loss"][0]


def test_nan_loss_stops_and_is_reported(tiny_plan_dict):
    plan = plan_from_dict(apply_overrides(tiny_plan_dict, {"optimizers.object.learning_rate": 1e30,
                                                            "constraints.object_amplitude.enabled": False,
                                                            "iterations": 6}))
    result = recon.reconstruct(plan)
    assert result.diverged and result.stop_reason.startswith("diverged")
    assert result.iterations_done < 6
    # the history holds exactly the finite iterations before the divergence; the object is the last finite one
    assert len(result.history.get("loss", [])) == result.iterations_done
    assert np.all(np.isfinite(result.history.get("loss", []))) and np.all(np.isfinite(result.object))


def test_callback_can_stop_and_sees_object(tiny_plan_dict):
    seen = []

    def callback(progress):
        seen.append((progress.iteration, progress.object().shape, progress.dx_A))
        return progress.iteration < 2

    result = recon.reconstruct(plan_from_dict(tiny_plan_dict), callback=callback)
    assert result.iterations_done == 2 and "callback" in result.stop_reason
    assert seen[0][1] == result.object.shape and seen[0][2] == pytest.approx(result.dx_A, rel=1e-5)


def test_heldout_positions_are_scored(tiny_plan_dict):
    plan = plan_from_dict(apply_overrides(tiny_plan_dict, {"data.heldout_fraction": 0.2, "data.heldout_seed": 3}))
    result = recon.reconstruct(plan)
    assert len(result.heldout_indices) == round(0.2 * 64)
    assert math.isfinite(result.heldout_loss) and result.heldout_loss > 0
    again = recon.reconstruct(plan)
    np.testing.assert_array_equal(again.heldout_indices, result.heldout_indices)


@pytest.mark.parametrize("override, fragment", [
    ({"noise_model": {"name": "gaussian"}}, "noise_model.name: allowed values are"),
    ({"optimizerz": {}}, "optimizerz: unknown key"),
    ({"probe": {"semiangle_mrad": -3}}, "probe.semiangle_mrad"),
    ({"constraints": {"z_blur": {"sigma": 1}}}, "constraints.z_blur.sigma: unknown key; allowed keys:"),
])
def test_bad_plan_names_key_and_allowed_values(tiny_plan_dict, override, fragment):
    with pytest.raises(recon.PlanError) as err:
        plan_from_dict(apply_overrides(tiny_plan_dict, override) if "optimizerz" not in override
                       else {**tiny_plan_dict, **override}, "plan.yml")
    message = str(err.value)
    assert message.startswith("plan.yml: ") and fragment in message and "\n" not in message


def test_missing_optics_value_is_a_plan_error(tmp_path):
    patterns = np.ones((4, 4, 16, 16), np.float32)
    np.save(tmp_path / "p.npy", patterns)
    plan = plan_from_dict({"data": {"path": str(tmp_path / "p.npy")}, "iterations": 1})
    with pytest.raises(recon.PlanError, match="probe.energy_eV"):
        recon.reconstruct(plan)


def test_npy_without_positions_needs_the_scan_step(tmp_path):
    """Grid indices are not Å: a .npy stack without positions must not silently use a 1 Å step."""
    np.save(tmp_path / "p.npy", np.ones((4, 4, 16, 16), np.float32))
    optics = {"probe": {"energy_eV": 80e3, "semiangle_mrad": 20.0, "defocus_A": 0.0}, "detector": {"dk_invA": 0.1}}
    plan = plan_from_dict({"data": {"path": str(tmp_path / "p.npy")}, "iterations": 1, **optics})
    with pytest.raises(recon.PlanError, match="scan.step_A"):
        recon.reconstruct(plan)
    stepped = plan_from_dict({"data": {"path": str(tmp_path / "p.npy")}, "iterations": 1, "scan": {"step_A": 0.7},
                              **optics})
    result = recon.reconstruct(stepped)
    spacing = np.diff(np.unique(np.round(result.positions_yx_A[:, 1], 4)))
    assert result.plan.scan.step_A == 0.7 and spacing == pytest.approx(np.full(3, 0.7), rel=1e-4)


def test_supersampled_object_halves_the_pixel(tiny_plan_dict):
    plain = recon.reconstruct(plan_from_dict(tiny_plan_dict))
    fine = recon.reconstruct(plan_from_dict(apply_overrides(tiny_plan_dict, {"object.supersample": 2})))
    assert fine.dx_A == pytest.approx(plain.dx_A / 2, rel=1e-5)
    assert fine.probe.shape[-1] == 2 * plain.probe.shape[-1]
    assert fine.object.shape[-1] >= 1.5 * plain.object.shape[-1]
    assert np.all(np.isfinite(fine.history["loss"])) and fine.history["loss"][-1] < fine.history["loss"][0]


def test_regulariser_weight_reaches_the_loss(tiny_plan_dict):
    def total_variation(result):
        phase = result.phase
        return np.abs(np.diff(phase, axis=0)).mean() + np.abs(np.diff(phase, axis=1)).mean()

    plain = recon.reconstruct(plan_from_dict(tiny_plan_dict))
    smooth = recon.reconstruct(plan_from_dict(apply_overrides(tiny_plan_dict, {"regularizers.object_tv": 1.0})))
    assert smooth.history["loss"][-1] > smooth.history["data_loss"][-1]
    assert plain.history["loss"][-1] == pytest.approx(plain.history["data_loss"][-1])
    assert total_variation(smooth) < total_variation(plain)


def test_command_line_overrides_are_parsed_safely():
    from recon.plan import parse_overrides

    assert parse_overrides(["object.supersample=2", "probe.tilt_mrad=[0.5, 0]", "data.patterns=dp"]) == {
        "object.supersample": 2, "probe.tilt_mrad": [0.5, 0], "data.patterns": "dp"}
    with pytest.raises(recon.PlanError, match="dotted.key=value"):
        parse_overrides(["iterations"])


@pytest.mark.parametrize("name", ["demo_recon.yml", "mos2_1l_recon.yml", "sto_10nm_recon.yml"])
def test_shipped_plans_validate(name):
    from pathlib import Path

    plan = recon.load_plan(Path(__file__).parent.parent / "studies" / name)
    assert plan.iterations > 0 and (plan.data.path or plan.data.simulate)


def test_complex_parameterisation_resumes_from_its_object(tiny_plan_dict):
    plan = plan_from_dict(apply_overrides(tiny_plan_dict, {"object.parameterization": "complex"}))
    first = recon.reconstruct(plan)
    resumed = recon.reconstruct(plan.model_copy(update={"iterations": 4}), resume=first)
    assert resumed.iterations_done == 4
    assert resumed.history["loss"][0] <= first.history["loss"][0]
