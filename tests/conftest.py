"""Shared fixtures: a tiny simulated dataset written once per test session."""
from __future__ import annotations

import os
import tempfile

import pytest

# Tests use their own compilation cache so they never depend on (or pollute) a user's cache.
os.environ.setdefault("PTYTUNE_JAX_CACHE", tempfile.mkdtemp(prefix="ptytune-test-jax-"))
# Subprocesses (`python -m tune ...` from a temporary folder) import the packages of this checkout,
# not whichever copy happens to be installed in the environment.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

from recon.plan import SimulationSpec  # noqa: E402

TINY_SIM = SimulationSpec(pattern_px=32, scan_shape=(8, 8), dk_invA=0.1, scan_step_A=0.6, dose_e_per_A2=(1.0e5,))


@pytest.fixture(scope="session")
def tiny_data_path(tmp_path_factory):
    """A small native-layout HDF5 dataset with ground truth (32×32 patterns, 8×8 scan)."""
    from recon.simulate import write_dataset

    return write_dataset(TINY_SIM, tmp_path_factory.mktemp("data") / "tiny.h5")


@pytest.fixture
def tiny_plan_dict(tiny_data_path):
    """A plan mapping for the tiny dataset (a few iterations)."""
    return {"iterations": 3, "batch_size": 16, "data": {"path": str(tiny_data_path), "patterns": "dp"}}
