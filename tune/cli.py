"""The `tune` command: run and inspect hyperparameter studies of ptychographic reconstructions.

User errors (a bad study or plan file, a missing data file, an unknown study) print one line
`error: ...` on stderr and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax

import metrics
from metrics.cli import score_main
from recon.plan import PlanError
from tune.dashboard import serve
from tune.export import best_plan_text
from tune.launch import preflight, start, worker_slots, write_study_report
from tune.notices import silence_deliberate_notices
from tune.progress import status_report
from tune.schema import ScoringSpec
from tune.single import run_plan
from tune.storage import load_existing
from tune.study import load_study
from tune.worker import run_worker

DESCRIPTION = """\
Hyperparameter optimisation for electron ptychography.

  tune start study.yml                     run a study on this machine (one worker per GPU)
  tune worker study.yml --device 1         join a running study (another shell, node or Slurm job)
  tune status study.yml                    trials done / pruned / failed, best so far
  tune best study.yml -o best.yml          export the best trial as a plan
  tune recon best.yml --score              run one reconstruction (and score it)
  tune report study.yml                    CSV of all trials and one HTML dashboard
  tune dashboard study.yml                 optuna-dashboard with per-trial images
  tune score ...                           score a result against ground truth
  tune inspect DATA                        what a data file holds and what a plan must still set
  tune init DATA -o study.yml              a starter study for your own data (no ground truth needed)

Run `tune COMMAND --help` for the options of each command."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"tune (ptytune) {version('ptytune')}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def study_command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=description)
        c.add_argument("study", metavar="STUDY", help="the study file (YAML)")
        c.add_argument("--storage", metavar="URL", help="storage URL instead of the study file's study.storage "
                       "(e.g. postgresql://user@host/db)")
        return c

    c = study_command("start", "create or resume a study and run it to its budget on this machine",
                      "Create the study (or resume it), run one worker process per device until the study's "
                      "n_trials are used, show live progress, and write the report at the end. Without options: "
                      "one worker per visible GPU, or one CPU worker without GPUs.")
    devices = c.add_mutually_exclusive_group()
    devices.add_argument("--workers", type=_positive, metavar="N",
                         help="number of worker processes (spread round-robin over the visible GPUs)")
    devices.add_argument("--devices", type=_device_list, metavar="IDS",
                         help="comma-separated GPU ids, one worker each; repeat an id to run several workers on "
                              "one GPU (e.g. 0,0,1,1)")
    c.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    c.add_argument("--no-final", action="store_true",
                   help="do not write best.yml and the chosen plan's full reconstruction at the end")
    c.add_argument("--check", action="store_true", help="only check the study file and its data (nothing is "
                   "written; a simulated dataset is not made)")

    c = study_command("worker", "join a study as one more worker",
                      "Run trials of a study until its budget is used. Start as many as you like, on any machine "
                      "that reaches the storage (for several machines use PostgreSQL). The study is created if it "
                      "does not exist yet.")
    c.add_argument("--device", metavar="ID", help="GPU id for this worker (sets CUDA_VISIBLE_DEVICES)")
    c.add_argument("--index", type=int, metavar="I", default=_env_index(),
                   help="worker index: its sampler seed is derived from the study seed and this index "
                        "(default: $SLURM_ARRAY_TASK_ID if set, else a random seed)")

    study_command("status", "show the trials of a study and the best so far",
                  "Trials finished / pruned / failed / running, the best trial(s) and their settings, per-worker counts.")

    c = study_command("best", "export the best trial as a reconstruction plan",
                      "Write the fully resolved plan of the best trial (or of --trial N); `tune recon` reproduces "
                      "its reconstruction and, with --score, its score. Several metrics: the trial of the Pareto "
                      "front best in the first metric.")
    c.add_argument("-o", "--output", type=Path, metavar="PLAN", help="plan file to write (default: print it)")
    c.add_argument("--trial", type=int, metavar="N", help="export this trial instead of the best")

    c = study_command("report", "write the CSV of all trials and the HTML report",
                      "Write a CSV of all trials and one self-contained HTML report (default under <output.dir>/report).")
    c.add_argument("-o", "--output", type=Path, metavar="DIR", help="folder for the report files")

    c = study_command("dashboard", "serve optuna-dashboard for the study, with per-trial images",
                      "Serve optuna-dashboard on the study's storage and artifact store. It has no "
                      "authentication: it binds to 127.0.0.1 unless told otherwise.")
    c.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=8080, help="port (default 8080)")

    c = sub.add_parser("recon", help="run one reconstruction from a plan file",
                       description="Run one reconstruction with a progress bar and save the result (HDF5).")
    c.add_argument("plan", metavar="PLAN", help="the plan file (YAML)")
    c.add_argument("--iterations", type=_positive, metavar="N", help="override the plan's iterations")
    c.add_argument("--data", metavar="PATH", help="override data.path")
    c.add_argument("--out", type=Path, metavar="RESULT",
                   help="result file (default: out/<plan stem>_result.h5 beside the plan file)")
    c.add_argument("--score", action="store_true", help="score the result against the data file's ground truth")
    c.add_argument("--ground-truth", default=metrics.GROUND_TRUTH_KEY, metavar="KEY",
                   help=f"HDF5 dataset of the true phase for --score (default {metrics.GROUND_TRUTH_KEY})")
    c.add_argument("--roi", choices=("scan", "full"), default="scan", help="--score: region scored (default scan)")
    c.add_argument("--margin-A", type=float, default=0.0, metavar="A", help="--score: margin around the scan in Å")

    c = sub.add_parser("inspect", help="show what a data file holds and what a plan must still set",
                       description="Read a data file as a reconstruction would (detector formats: EMPAD .xml, "
                                   "Merlin .mib, Gatan .dm3/.dm4, Arina, EMD/py4DSTEM; or HDF5/.npy) and print its "
                                   "shape, dtype, calibration, disk centre and spread, counts and missing plan keys.")
    c.add_argument("data", metavar="DATA", help="the data file")
    c.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a data.* key (data.format=mib, data.scan_shape=[64,64]) or a known value "
                        "(probe.energy_eV, probe.semiangle_mrad, probe.defocus_A, detector.dk_invA, scan.step_A)")

    c = sub.add_parser("init", help="write a starter study for a data file",
                       description="Inspect DATA and write a study: nominal optics from the file (and --set), a "
                                   "search over defocus, scan rotation, learning rates and TV, objective heldout_loss.")
    c.add_argument("data", metavar="DATA", help="the data file")
    c.add_argument("-o", "--output", type=Path, required=True, metavar="STUDY", help="study file to write")
    c.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="as for tune inspect, e.g. --set probe.semiangle_mrad=21 --set scan.step_A=0.5")
    c.add_argument("--name", help="study name (default: from the file name)")
    c.add_argument("--trials", type=_positive, default=40, metavar="N", help="n_trials (default 40)")
    c.add_argument("--iterations", type=_positive, default=30, metavar="N", help="iterations per trial (default 30)")

    sub.add_parser("score", help="score a result against ground truth (see tune score --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    args = _parser().parse_args(argv)
    silence_deliberate_notices()
    try:
        return COMMANDS[args.command](args)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # tune.storage.StorageUnreachable: the storage stayed out of reach
        print(f"error: {err}", file=sys.stderr)
        return 75
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------- commands
def _start(args: argparse.Namespace) -> int:
    config = load_study(args.study, args.storage)
    if args.check:
        preflight(config)
        print(f"{args.study}: ok (study {config.name}, {config.budget} trials, storage {config.storage_url})")
        return 0
    return start(config, worker_slots(args.devices, args.workers), report=not args.no_report,
                 final=not args.no_final).status


def _worker(args: argparse.Namespace) -> int:
    if args.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device  # before JAX picks a device
    config = load_study(args.study, args.storage)
    return run_worker(config, args.index, f"gpu:{args.device}" if args.device is not None else _default_device())


def _status(args: argparse.Namespace) -> int:
    config = load_study(args.study, args.storage)
    print(status_report(load_existing(config), config))
    return 0


def _best(args: argparse.Namespace) -> int:
    config = load_study(args.study, args.storage)
    text, summary = best_plan_text(load_existing(config), config, args.trial, str(args.output or "PLAN"))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}: {summary}")
    return 0


def _report(args: argparse.Namespace) -> int:
    config = load_study(args.study, args.storage)
    load_existing(config)
    print(write_study_report(config, args.output))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    config = load_study(args.study, args.storage)
    load_existing(config)
    print(f"optuna-dashboard for study {config.name}: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    serve(config.storage_url, config.artifact_dir, host=args.host, port=args.port)
    return 0


def _recon(args: argparse.Namespace) -> int:
    scoring = ScoringSpec(roi=args.roi, margin_A=args.margin_A) if args.score else None
    return run_plan(Path(args.plan), iterations=args.iterations, data=args.data, out=args.out,
                    scoring=scoring, ground_truth=args.ground_truth)


def _inspect(args: argparse.Namespace) -> int:
    from recon.plan import parse_overrides
    from tune.inspect import format_inspection, inspect_data

    print(format_inspection(inspect_data(args.data, parse_overrides(args.settings))))
    return 0


def _init(args: argparse.Namespace) -> int:
    from recon.plan import parse_overrides
    from tune.inspect import inspect_data, write_starter_study

    ins = inspect_data(args.data, parse_overrides(args.settings))
    print(write_starter_study(ins, args.output, name=args.name, n_trials=args.trials, iterations=args.iterations))
    return 0


COMMANDS: dict[str, Any] = {
    "start": _start, "worker": _worker, "status": _status, "best": _best, "report": _report,
    "dashboard": _dashboard, "recon": _recon, "inspect": _inspect, "init": _init,
}


# --------------------------------------------------------------------------- helpers
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _device_list(text: str) -> list[str]:
    ids = [d.strip() for d in text.split(",")]
    if not ids or not all(d.isdigit() for d in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids such as 0,1 (got {text!r})")
    return ids


def _env_index() -> int | None:
    value = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    return int(value) if value.isdigit() else None


def _default_device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.id}"

