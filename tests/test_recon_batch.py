"""Batched reconstructions: K plans as one vmapped program give what each gives alone."""
import numpy as np
import pytest

import recon
from recon.plan import apply_overrides, plan_from_dict

#: Batched and alone agree to this relative tolerance (losses; objects and probes in the L2 norm);
#: measured: ~1e-5. Not bitwise: the vmapped program rounds differently (initial probes differ by
#: ~1e-7 relative). The tests use the intensity noise model: the Poisson gradient 1 − I/(model + ε)
#: amplifies rounding-level model intensities in the dark field of the first iterations (vacuum
#: object), so there batched and alone differ by ~1 % in loss after four iterations, as do two runs
#: whose inputs differ by one rounding step.
RTOL = 1e-4


def _variants(tiny_plan_dict, n=4):
    return [plan_from_dict(apply_overrides(tiny_plan_dict, {
        "iterations": 4, "seed": i, "probe.defocus_A": -80.0 - 15.0 * i, "noise_model.name": "intensity",
        "optimizers.object.learning_rate": 0.01 * (1 + i), "scan.rotation_deg": 2.0 * i})) for i in range(n)]


def _close(a, b):
    return np.linalg.norm(a - b) <= RTOL * np.linalg.norm(b - np.mean(b))


def test_batched_trials_equal_trials_run_alone(tiny_plan_dict):
    plans = _variants(tiny_plan_dict)
    dataset = recon.load_dataset(plans[0].data)
    batched = recon.reconstruct_batch(plans, dataset=dataset)
    alone = [recon.reconstruct(p, dataset=dataset) for p in plans]
    for b, a in zip(batched, alone):
        assert b.iterations_done == a.iterations_done == 4 and b.stop_reason == "completed"
        np.testing.assert_allclose(b.history["loss"], a.history["loss"], rtol=RTOL)
        assert _close(b.object, a.object) and _close(b.probe, a.probe)
        assert b.dx_A == pytest.approx(a.dx_A) and b.origin_yx_A == pytest.approx(a.origin_yx_A)
    # the trials really differ: a batch is not K copies of one trial
    assert not _close(batched[0].object, batched[3].object)


def test_a_stopped_trial_freezes_while_the_others_go_on(tiny_plan_dict):
    plans = _variants(tiny_plan_dict, 3)
    dataset = recon.load_dataset(plans[0].data)
    seen = {0: [], 1: [], 2: []}

    def stop_at(i, at):
        def callback(progress):
            seen[i].append(progress.iteration)
            return progress.iteration < at
        return callback

    results = recon.reconstruct_batch(plans, dataset=dataset, callbacks=[stop_at(0, 99), stop_at(1, 2), stop_at(2, 99)])
    assert seen[1] == [1, 2] and seen[0] == seen[2] == [1, 2, 3, 4]
    assert results[1].iterations_done == 2 and "callback" in results[1].stop_reason
    alone = recon.reconstruct(plans[1], dataset=dataset, callback=lambda p: p.iteration < 2)
    assert _close(results[1].object, alone.object)
    assert results[0].iterations_done == 4 and _close(results[0].object, recon.reconstruct(plans[0], dataset=dataset).object)


def test_a_diverging_trial_fails_alone(tiny_plan_dict):
    plans = _variants(tiny_plan_dict, 2)
    bad = plan_from_dict(apply_overrides(plans[1].model_dump(mode="json"), {
        "optimizers.object.learning_rate": 1e30, "constraints.object_amplitude.enabled": False}))
    dataset = recon.load_dataset(plans[0].data)
    good, diverged = recon.reconstruct_batch([plans[0], bad], dataset=dataset)
    assert diverged.diverged and diverged.stop_reason.startswith("diverged") and np.all(np.isfinite(diverged.object))
    assert not good.diverged and good.iterations_done == 4
    assert _close(good.object, recon.reconstruct(plans[0], dataset=dataset).object)


def test_plans_with_different_shapes_are_refused(tiny_plan_dict):
    plans = _variants(tiny_plan_dict, 2)
    other = plan_from_dict(apply_overrides(tiny_plan_dict, {"probe.modes": 2}))
    with pytest.raises(recon.PlanError, match="static configuration"):
        recon.reconstruct_batch([plans[0], other])
    assert recon.static_key(plans[0], recon.load_dataset(plans[0].data)) != recon.static_key(
        other, recon.load_dataset(other.data))


class _FakeDevice:
    def __init__(self, platform, stats):
        self.platform, self._stats = platform, stats

    def memory_stats(self):
        return self._stats


def test_auto_trials_per_batch_fills_free_device_memory():
    from recon.engine import CPU_TRIALS_PER_BATCH, MAX_TRIALS_PER_BATCH, auto_trials_per_batch

    gpu = _FakeDevice("gpu", {"bytes_limit": 80 * 2**30, "bytes_in_use": 10 * 2**30})
    # 70 GiB free, 1 GiB shared data, 0.7 of the rest for trials of 2 GiB each: 24
    assert auto_trials_per_batch(2 * 2**30, 2**30, gpu) == 24
    assert auto_trials_per_batch(2**20, 0, gpu) == MAX_TRIALS_PER_BATCH
    assert auto_trials_per_batch(100 * 2**30, 0, gpu) == 1
    assert auto_trials_per_batch(2**20, 0, _FakeDevice("cpu", None)) == CPU_TRIALS_PER_BATCH
    assert auto_trials_per_batch(2**20, 0, _FakeDevice("gpu", {})) == CPU_TRIALS_PER_BATCH


def test_trial_bytes_grow_with_the_problem(tiny_plan_dict):
    from recon.lower import fft_bytes_per_iteration, lower, trial_bytes

    plan = plan_from_dict(tiny_plan_dict)
    dataset = recon.load_dataset(plan.data)
    small = lower(plan, dataset).static
    big = lower(plan_from_dict(apply_overrides(tiny_plan_dict, {"probe.modes": 3, "object.slices": 4})), dataset).static
    assert trial_bytes(big) > 3 * trial_bytes(small) > 0
    assert fft_bytes_per_iteration(big) == 12 * fft_bytes_per_iteration(small)
