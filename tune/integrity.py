"""Integrity of a study's inputs: the data file's values and its fingerprint.

* `load_checked_data(config)` loads the base plan's dataset through `recon.load_dataset` (which
  checks the values with `recon.validate`): a truncated or unreadable HDF5 file, NaN or Inf in the
  patterns, negative counts, positions whose count differs from the patterns', an empty scan: each
  is one `PlanError` naming the file and the key. `tune start` runs it before the study exists in
  the storage; a worker runs it before it joins.
* `fingerprint(path, key)`: size, shape and dtype of the patterns, and a SHA-256 of a bounded
  sample of the file (up to SAMPLE_BLOCKS blocks of BLOCK_BYTES spread over it, so a 100 GB file
  costs a few MB of reading). Not the modification time: a copy of the same file on another
  node's scratch disk is the same data. `check_fingerprint` records it in the study (user attribute
  FINGERPRINT_ATTR) when the study is created and refuses a worker whose data file differs.
* `storage_failure(err)`: the `StorageUnreachable` behind an error, if any (Optuna may wrap it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import optuna

import recon
from recon.plan import PlanError
from tune.storage import StorageUnreachable
from tune.study import StudyConfig

FINGERPRINT_ATTR = "data_fingerprint"
SAMPLE_BLOCKS = 16
BLOCK_BYTES = 64 * 1024


def load_checked_data(config: StudyConfig) -> Any:
    """The base plan's dataset (recon.Dataset), or a one-line PlanError naming the file and key."""
    try:
        return recon.load_dataset(config.base_plan.data)
    except OSError as err:  # h5py: a truncated or damaged file
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PlanError(f"{config.file}: data.path: cannot read {config.data_path} "
                        f"(truncated or damaged file? {text})") from None


def fingerprint(path: Path, patterns_key: str) -> dict[str, Any]:
    """Size, pattern shape and dtype, and a hash of a bounded sample of the file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        starts = sorted({int(o) for o in np.linspace(0, max(size - BLOCK_BYTES, 0), SAMPLE_BLOCKS)})
        for start in starts:
            f.seek(start)
            digest.update(f.read(BLOCK_BYTES))
    shape: list[int] | None = None
    dtype: str | None = None
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, dtype = list(array.shape), str(array.dtype)
        else:
            with h5py.File(path, "r") as h5:
                dataset = h5.get(patterns_key)
                if isinstance(dataset, h5py.Dataset):
                    shape, dtype = list(dataset.shape), str(dataset.dtype)
    except (OSError, ValueError):
        pass  # unreadable files are reported by load_checked_data; the hash still tells them apart
    return {"size": size, "shape": shape, "dtype": dtype, "sha256_sample": digest.hexdigest()}


def check_fingerprint(study: optuna.Study, config: StudyConfig) -> None:
    """Record the data file's fingerprint in a new study; refuse (PlanError) if it changed since.
    Simulated data is skipped: its file is named by the hash of its settings."""
    if config.spec.data.simulate is not None:
        return
    current = json.loads(json.dumps(fingerprint(config.data_path, config.spec.data.patterns)))
    recorded = study.user_attrs.get(FINGERPRINT_ATTR)
    if recorded is None:
        study.set_user_attr(FINGERPRINT_ATTR, current)
        return
    if recorded != current:
        changed = [f"{k} {recorded.get(k)} → {current.get(k)}" for k in ("size", "shape", "dtype")
                   if recorded.get(k) != current.get(k)] or ["content (sampled hash) differs"]
        raise PlanError(f"{config.file}: data.path: {config.data_path} changed since study {config.name!r} was "
                        f"created ({'; '.join(changed)}); restore the original file or start a new study")


def storage_failure(err: BaseException | None) -> StorageUnreachable | None:
    """The StorageUnreachable that caused `err` (itself, its cause or context), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, StorageUnreachable):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
