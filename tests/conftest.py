"""Shared fixtures: a tiny simulated dataset written once per test session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests use their own compilation cache so they never depend on (or pollute) a user's cache.
os.environ.setdefault("PTYTUNE_JAX_CACHE", tempfile.mkdtemp(prefix="ptytune-test-jax-"))
# Processes the tests start (`python -m tune ...`) import this checkout, not whichever one the
# environment has installed (a virtual environment shared by several clones or worktrees).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH")]))

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
