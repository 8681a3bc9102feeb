"""`tune start`: create the study, run one worker process per device, show progress, write the report.

Workers are fresh Python processes (`python -m tune worker ...`), never forks of a process that
has initialised JAX. Each gets `CUDA_VISIBLE_DEVICES` for its GPU; where several workers share a
GPU, JAX's memory preallocation is turned off for them. Their output goes to
`<output.dir>/logs/worker-<i>.log`. Workers run in their own session, so a Ctrl-C in the terminal
reaches `tune start` alone, which stops them with one SIGTERM each (as it does when it gets SIGTERM).

`run_study` is the same from Python (a notebook).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import jax
import optuna

import metrics
from tune import budget
from tune.integrity import check_fingerprint, load_checked_data
from tune.final import final_section, write_final
from tune.notices import silence_deliberate_notices
from tune.progress import TrialProgress, progress_line
from tune.report import write_report
from tune.storage import StorageUnreachable, create_or_load, open_study_storage
from tune.study import StudyConfig, check_data, load_study
from tune.worker import ensure_data

PROGRESS_POLL_S = 2.0


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    device: str | None  # a GPU id for CUDA_VISIBLE_DEVICES, or None for the default device (CPU)
    shares_device: bool


def visible_gpus() -> list[str]:
    """GPU ids on this machine: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


@dataclass(frozen=True)
class StudyRun:
    """What a run of a study did: its exit status (0: the budget is used; 1: workers failed before
    it was; 130: interrupted), the study and the report written (None without one)."""

    status: int
    study: optuna.Study
    report: Path | None


def run_study(study: str | Path | StudyConfig, *, workers: int | None = None, devices: Sequence[str] | None = None,
              storage: str | None = None, report: bool = True, final: bool = True) -> StudyRun:
    """Run a study to its budget from Python, as `tune start` does: `study` is a study file (or a
    loaded `StudyConfig`); `workers` / `devices` as `--workers` / `--devices`; `storage` replaces
    study.storage; `final=False` as `--no-final`."""
    silence_deliberate_notices()
    config = study if isinstance(study, StudyConfig) else load_study(study, storage)
    return start(config, worker_slots(list(devices) if devices is not None else None, workers), report=report,
                 final=final)


def worker_slots(devices: list[str] | None, workers: int | None) -> list[WorkerSlot]:
    """Assign workers to devices round-robin. Without GPUs, all workers use the CPU."""
    devices = devices if devices is not None else visible_gpus()
    n = workers or len(devices) or 1
    assigned = [devices[i % len(devices)] if devices else None for i in range(n)]
    per_device = Counter(assigned)
    return [WorkerSlot(i, d, d is not None and per_device[d] > 1) for i, d in enumerate(assigned)]


def start(config: StudyConfig, slots: list[WorkerSlot], report: bool = True, final: bool = True) -> StudyRun:
    """Run the study to its budget (and its refinement): spawn the workers, show progress until they
    exit, write the chosen plan and its full reconstruction (`tune.final`, unless `final` is False)
    and the report."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _simulate_on_cpu(config)
    preflight(config)
    study = create_or_load(config, open_study_storage(config, heartbeats=False))
    check_fingerprint(study, config)
    logs = config.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"study {config.name}: {config.budget} trials, {len(slots)} workers "
          f"({', '.join(s.device and f'GPU {s.device}' or 'CPU' for s in slots)}), storage {config.storage_url}; "
          f"results in {config.output_dir}", flush=True)
    with _sigterm_interrupts():
        procs = [_spawn(config, slot, logs) for slot in slots]
        try:
            _watch(study, config, procs)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping workers (their running trials are failed and re-queued)", flush=True)
            _stop(procs)
            return StudyRun(130, study, None)
    codes = [p.returncode for p in procs]
    print(progress_line(study, config), flush=True)
    for slot, code in zip(slots, codes):
        if code != 0:
            print(f"warning: worker {slot.index} exited with status {code}; see {logs / f'worker-{slot.index}.log'}",
                  file=sys.stderr)
    if final:
        chosen = write_final(study, config, config.output_dir / "report")
        if chosen is not None:
            print(f"best plan: {chosen.plan_path} ({chosen.caption})", flush=True)
    html = write_study_report(config, with_final=final) if report else None
    if html is not None:
        print(f"report: {html}", flush=True)
    return StudyRun(0 if _finished(study, config) or all(c == 0 for c in codes) else 1, study, html)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While workers run, SIGTERM to `tune start` (a batch system stopping it) stops them as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every running worker (each fails and re-queues its trial), then wait for them."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()


def preflight(config: StudyConfig) -> None:
    """The checks `tune start` runs before it touches the storage (`tune start --check` runs only
    these): the data file, its datasets and its values (the whole file is read once)."""
    check_data(config)
    if config.spec.data.simulate is None or config.data_path.is_file():
        load_checked_data(config)


def _simulate_on_cpu(config: StudyConfig) -> None:
    """Write a simulated dataset in this process, on the CPU, so it never holds GPU memory."""
    if config.spec.data.simulate is not None and not config.data_path.is_file():
        jax.config.update("jax_platforms", "cpu")
        print(f"simulating the dataset: {config.data_path}", flush=True)
        ensure_data(config)


def _spawn(config: StudyConfig, slot: WorkerSlot, logs: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "tune", "worker", str(config.file), "--index", str(slot.index),
           "--storage", config.storage_url]
    if slot.device is not None:
        cmd += ["--device", slot.device]
        env["CUDA_VISIBLE_DEVICES"] = slot.device
        if slot.shares_device:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    log = open(logs / f"worker-{slot.index}.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # a terminal's Ctrl-C reaches tune start only
    finally:
        log.close()


def _watch(study: optuna.Study, config: StudyConfig, procs: list[subprocess.Popen[bytes]]) -> None:
    """Show progress (`tune.progress.TrialProgress`) until every worker has exited; while the storage
    is out of reach the workers decide for themselves and the display waits."""
    progress = TrialProgress(config, budget.count(study.get_trials(deepcopy=False)).finished)
    try:
        while any(p.poll() is None for p in procs):
            try:
                progress.update(study)
            except StorageUnreachable:
                pass
            time.sleep(PROGRESS_POLL_S)
    finally:
        progress.close()


def _finished(study: optuna.Study, config: StudyConfig) -> bool:
    return budget.count(study.get_trials(deepcopy=False)).finished >= config.budget


def write_study_report(config: StudyConfig, out_dir: Path | None = None, with_final: bool = True) -> Path:
    """Write the CSV and HTML report of the study (tune.report); returns the HTML file. The best
    reconstructions are scored as the trials were: the study's ground-truth key and scoring options.
    `with_final`: show the final reconstruction the last `tune start` wrote into the folder."""
    key = config.spec.data.ground_truth
    folder = out_dir or config.output_dir / "report"
    paths = write_report(config.storage_url, config.name, folder,
                         ground_truth=None if key is None else config.data_path,
                         ground_truth_key=key or metrics.GROUND_TRUTH_KEY,
                         artifact_dir=config.artifact_dir, score_options=config.spec.objective.scoring.model_dump(),
                         final=final_section(folder) if with_final else None)
    return paths.html
