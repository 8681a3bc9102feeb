"""Out of device memory, a batch is split in half and retried until it fits; no trial is lost."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import recon
from tune import batch


class _Objective:
    """What tune.batch needs of an Objective, recording what it was asked."""

    def __init__(self):
        self.finished = []

    def reporter(self, trial):
        return None

    def dataset(self, data):
        return None

    def finish(self, trial, result, reporter, compiled, info):
        self.finished.append((trial, result, info.size))
        return 0.0


def test_out_of_memory_splits_the_batch_until_it_fits(monkeypatch):
    calls = []

    def fake_batch(plans, dataset=None, callbacks=None):
        calls.append(len(plans))
        if len(plans) > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB")
        return [SimpleNamespace(iterations_done=5, plan=p) for p in plans]

    monkeypatch.setattr(recon, "reconstruct_batch", fake_batch)
    objective = _Objective()
    group = [batch.Pending(trial=f"t{i}", plan=SimpleNamespace(name=f"p{i}", data=None)) for i in range(7)]
    outcomes = list(batch._run_group(objective, group, "host:1:0"))
    assert calls == [7, 3, 1, 2, 4, 2, 2]
    assert [p.trial for p, _ in outcomes] == [f"t{i}" for i in range(7)]  # every trial, in order
    for _, step in outcomes:
        step()
    assert [(t, r.plan.name, size) for t, r, size in objective.finished] == [
        ("t0", "p0", 1), ("t1", "p1", 2), ("t2", "p2", 2), ("t3", "p3", 2), ("t4", "p4", 2), ("t5", "p5", 2),
        ("t6", "p6", 2)]


def test_other_errors_fail_each_trial_of_the_group(monkeypatch):
    def broken(plans, dataset=None, callbacks=None):
        raise ValueError("bad plan")

    monkeypatch.setattr(recon, "reconstruct_batch", broken)
    outcomes = list(batch._run_group(_Objective(), [batch.Pending("a", SimpleNamespace(data=None)), batch.Pending("b", SimpleNamespace(data=None))], "h:1:0"))
    assert [p.trial for p, _ in outcomes] == ["a", "b"]
    for _, step in outcomes:
        with pytest.raises(ValueError, match="bad plan"):
            step()


def _config(chosen):
    return SimpleNamespace(spec=SimpleNamespace(study=SimpleNamespace(trials_per_batch=chosen)),
                           base_plan=SimpleNamespace(data=None))


def test_auto_is_one_on_a_cpu_without_lowering_and_when_the_base_plan_cannot_be_lowered(monkeypatch):
    def cannot_lower(plan, dataset):
        raise recon.PlanError("probe.defocus_A is not in the data file; set it in the plan")

    monkeypatch.setattr(batch, "lower", cannot_lower)
    objective = _Objective()
    assert batch.resolve_trials_per_batch(_config(6), objective) == 6
    monkeypatch.setattr(batch, "free_device_bytes", lambda: None)  # a CPU: the base plan is not even lowered
    assert batch.resolve_trials_per_batch(_config("auto"), objective) == 1
    monkeypatch.setattr(batch, "free_device_bytes", lambda: 80 * 2**30)  # a GPU, but a searched optic is missing
    assert batch.resolve_trials_per_batch(_config("auto"), objective) == 1
