"""Do the truth-free objectives pick the trial the ground truth would pick?

Usage: python benchmarks/truthfree.py [--cases mos2_1l aberrated lowdose] [--trials 24] [--iterations 25]
         [--refine-iterations 100] [--fit-iterations 30] [--top-k 3] [--data-dir ../shared/data]
         [--out out/truthfree] [--resume]
       python benchmarks/truthfree.py --cases mos2_1l --sweep scan.rotation_deg=-4,-2,-1,0,1,2,4
         [--at probe.defocus_A=-100 ...]
       python benchmarks/truthfree.py --file DATA.h5 [--patterns dp_noisy/dose_1e+05]   (any dataset
         with a ground truth in the native layout: case "file", see file_case)

One set of trials per case, shared by every objective (the design the README describes): the
settings of each trial are drawn by a Latin hypercube over the search space (no objective guides
the sampling, so no objective is favoured), each trial is reconstructed at `--iterations` from the
full scan (10 % of the positions held out) and from the two checkerboard halves, and every score is
recorded: the truth's NRMSE, data_loss, heldout_loss and the half-set FRC (resolution and area).
Each objective's pick is then evaluated offline. Every trial is also reconstructed at
`--refine-iterations`, which gives the truth's NRMSE of the long reconstruction users keep; the
refinement of each objective re-runs its `--top-k` short trials long (the half-set objectives their
halves too) and picks among them by the objective. The refinement with fitted optics
(`study.refine.fit`) re-runs the same `--top-k` trials for `--fit-iterations` with the case's searched
optics fitted (`probe.fit`, `scan.fit`: Gauss-Newton on the optics with the object, from each trial's
values) and picks among them by the objective; its pick is compared with the best trial of all
(short, long and fitted).

Printed: per case and objective, Spearman ρ between the objective (oriented so that lower is better)
and the NRMSE over the trials, and the NRMSE of the pick against the best trial's (ratio − 1), for
the short trials and for the refined pick against the best long reconstruction. Every record is
written to `<out>/<case>.json`.

`--sweep KEY=V1,V2,...` instead varies one setting from the base plan (with `--at KEY=VALUE` settings,
e.g. the true optics) and prints every score at `--iterations`: does each objective have its
optimum where the NRMSE has it?
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import qmc, spearmanr

import metrics
import recon
from metrics.halfset import compare_halves
from recon.halfset import reconstruct_halves
from recon.plan import Aberrations, DataSpec, SimulationSpec, apply_overrides
from tune.refine import fit_overrides
from recon.simulate import write_dataset

HELDOUT_FRACTION = 0.1
#: objective → (score key, +1 minimise / −1 maximise)
OBJECTIVES = {
    "data_loss": ("data_loss", 1.0),
    "heldout_loss": ("heldout_loss", 1.0),
    "halfset_frc_resolution_A": ("halfset_frc_resolution_A", 1.0),
    "halfset_frc_area": ("halfset_frc_area", -1.0),
}


@dataclass(frozen=True)
class Dimension:
    """One searched plan setting: a range, sampled uniformly or in log."""

    key: str
    low: float
    high: float
    log: bool = False

    def value(self, u: float) -> float:
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))


@dataclass(frozen=True)
class Case:
    """A dataset (file and patterns), the base plan with nominal (wrong) optics, and the search."""

    data: dict
    base: dict
    search: tuple[Dimension, ...]
    simulate: SimulationSpec | None = None
    notes: str = ""
    fit: tuple[str, ...] = ()  # plan key paths the refinement with fitted optics fits


COMMON_SEARCH = (
    Dimension("optimizers.probe.learning_rate", 1e-4, 3e-2, log=True),
    Dimension("regularizers.object_tv", 1e-5, 3e-2, log=True),
)
BASE_PLAN = {"batch_size": 32, "seed": 0,
             "optimizers": {"object": {"name": "adam", "learning_rate": 0.05},
                            "probe": {"name": "adam", "learning_rate": 0.01}}}
ABERRATED = SimulationSpec(pattern_px=48, scan_shape=(16, 16), dose_e_per_A2=(1e5,), seed=11,
                           aberrations=Aberrations(C12_A=25.0, phi12_deg=40.0, C21_A=300.0, phi21_deg=-30.0,
                                                   C30_A=2.0e4),
                           scan_rotation_deg=4.0, source_fwhm_A=0.4)
#: The searched optics that the refinement with fitted optics fits.
OPTICS_FIT = ("probe.defocus_A", "probe.aberrations.C12_A", "probe.aberrations.phi12_deg", "scan.rotation_deg")
LOWDOSE = SimulationSpec(pattern_px=48, scan_shape=(16, 16), dose_e_per_A2=(1e4,), seed=12, source_fwhm_A=0.3)

CASES = {
    "mos2_1l": Case(
        data={"path": "{data_dir}/mos2_1l.h5", "patterns": "dp_noisy/dose_1e+05",
              "subset": {"mode": "center", "shape": [16, 16]}},
        base={**BASE_PLAN, "probe": {"defocus_A": -50.0}},
        search=(Dimension("probe.defocus_A", -200.0, 0.0), Dimension("probe.aberrations.C12_A", 0.0, 30.0),
                Dimension("probe.aberrations.phi12_deg", 0.0, 180.0), Dimension("scan.rotation_deg", -5.0, 5.0),
                *COMMON_SEARCH),
        fit=OPTICS_FIT,
        notes="shared abTEM data, 16×16 central positions of 64² px, dose 1e5 e/Å², true defocus −100 Å"),
    "aberrated": Case(
        data={"path": "{out}/aberrated.h5", "patterns": "dp_noisy/dose_1e+05"},
        base={**BASE_PLAN, "probe": {"defocus_A": -60.0}},
        search=(Dimension("probe.defocus_A", -180.0, -20.0), Dimension("probe.aberrations.C12_A", 0.0, 50.0),
                Dimension("probe.aberrations.phi12_deg", -90.0, 90.0), Dimension("scan.rotation_deg", -8.0, 8.0),
                *COMMON_SEARCH),
        simulate=ABERRATED, fit=OPTICS_FIT,
        notes="simulated: defocus −100 Å, C12 25 Å at 40°, C21 300 Å, C30 2 µm, scan rotation 4°, "
              "source 0.4 Å FWHM, dose 1e5 e/Å²; nominal optics: defocus −60 Å, no C12, no rotation"),
    "lowdose": Case(
        data={"path": "{out}/lowdose.h5", "patterns": "dp_noisy/dose_1e+04"},
        base={**BASE_PLAN, "probe": {"defocus_A": -80.0}},
        search=(Dimension("probe.defocus_A", -160.0, -40.0), Dimension("optimizers.object.learning_rate", 5e-3, 0.2,
                                                                        log=True),
                *COMMON_SEARCH),
        simulate=LOWDOSE, fit=("probe.defocus_A",),
        notes="simulated: defocus −100 Å, source 0.3 Å FWHM, dose 1e4 e/Å² (2500 e per pattern)"),
}


def file_case(path: str, patterns: str) -> Case:
    """Any native-layout file with a ground truth: its central 16 × 16 positions (fewer if the scan
    is smaller), nominal defocus 50 Å above the file's, the mos2_1l search with the defocus range
    centred on the file's value."""
    dataset = recon.load_dataset(DataSpec(path=path, patterns=patterns))
    grid = dataset.scan_shape or (16, 16)
    true_defocus = float(dataset.defocus_A or 0.0)
    return Case(
        data={"path": path, "patterns": patterns, "subset": {"mode": "center", "shape": [min(16, grid[0]),
                                                                                       min(16, grid[1])]}},
        base={**BASE_PLAN, "probe": {"defocus_A": true_defocus + 50.0}},
        search=(Dimension("probe.defocus_A", true_defocus - 100.0, true_defocus + 100.0),
                *CASES["mos2_1l"].search[1:]),
        fit=OPTICS_FIT,
        notes=f"{path}::{patterns}, central positions, file defocus {true_defocus:g} Å, nominal {true_defocus + 50:g} Å")


@dataclass
class Trial:
    """Everything recorded about one trial: its settings, short scores and long scores."""

    number: int
    values: dict[str, float]
    short: dict[str, float] = field(default_factory=dict)
    long: dict[str, float] = field(default_factory=dict)
    fitted: dict[str, float] = field(default_factory=dict)


def trial_plan(case: Case, values: dict[str, float], data: dict, iterations: int, fit: tuple[str, ...] = ()) -> recon.Plan:
    """The case's plan with the trial's values; `fit` (plan key paths) fitted as `study.refine.fit` does."""
    raw = apply_overrides({**case.base, "iterations": iterations, "data": {**data, "heldout_fraction": HELDOUT_FRACTION}},
                          {**values, **fit_overrides(fit)})
    return recon.plan_from_dict(raw, "truthfree")


def sample(case: Case, n: int, seed: int) -> list[dict[str, float]]:
    """n settings from a Latin hypercube over the case's search space."""
    u = qmc.LatinHypercube(d=len(case.search), seed=seed).random(n)
    return [{d.key: d.value(x) for d, x in zip(case.search, row)} for row in u]


def full_scores(plan: recon.Plan, dataset: recon.Dataset, scorer: metrics.Scorer) -> dict[str, float]:
    result = recon.reconstruct(plan, dataset=dataset)
    if result.diverged:
        return {"nrmse": math.nan, "data_loss": math.nan, "heldout_loss": math.nan}
    s = scorer.score(result)
    return {"nrmse": s["nrmse"], "scale": s["scale"], "data_loss": result.final_data_loss,
            "heldout_loss": result.heldout_loss, "run_s": result.run_s,
            **{f"fitted {k}": v for k, v in result.fitted.items()}}


def halfset_scores(plan: recon.Plan, dataset: recon.Dataset) -> dict[str, float]:
    t0 = time.perf_counter()
    a, b = reconstruct_halves(plan, dataset)
    if a.diverged or b.diverged:
        return {key: math.nan for key in ("halfset_frc_resolution_A", "halfset_frc_area")}
    return {**compare_halves(a, b).scores(), "halfset_s": time.perf_counter() - t0}


def oriented(trials: list[Trial], objective: str, stage: str) -> np.ndarray:
    """The objective per trial, lower is better; NaN (diverged) counts as worst."""
    key, sign = OBJECTIVES[objective]
    values = np.array([sign * getattr(t, stage).get(key, math.nan) for t in trials])
    return np.where(np.isfinite(values), values, np.inf)


def evaluate(trials: list[Trial], top_k: int) -> dict[str, dict[str, float]]:
    """Per objective: Spearman ρ with NRMSE, and the pick's NRMSE relative to the best trial's."""
    nrmse = np.array([t.short["nrmse"] for t in trials])
    nrmse_long = np.array([t.long.get("nrmse", math.nan) for t in trials])
    nrmse_fit = np.array([t.fitted.get("nrmse", math.nan) for t in trials])
    best, best_long = np.nanmin(nrmse), np.nanmin(nrmse_long)
    best_all = float(np.nanmin(np.concatenate([nrmse, nrmse_long, nrmse_fit])))
    out = {}
    for name in OBJECTIVES:
        value = oriented(trials, name, "short")
        finite = np.isfinite(value) & np.isfinite(nrmse)
        pick = int(np.argmin(value))
        top = np.argsort(value)[:top_k]
        refined = [i for i in top if math.isfinite(trials[i].long.get(OBJECTIVES[name][0], math.nan))]
        value_long = oriented([trials[i] for i in refined], name, "long")
        pick_long = refined[int(np.argmin(value_long))] if refined else pick
        fitted = [i for i in top if math.isfinite(trials[i].fitted.get(OBJECTIVES[name][0], math.nan))]
        pick_fit = int(fitted[int(np.argmin(oriented([trials[i] for i in fitted], name, "fitted")))]) if fitted else None
        out[name] = {
            "spearman": float(spearmanr(value[finite], nrmse[finite]).statistic),
            "pick": pick, "pick_nrmse": float(nrmse[pick]), "best_nrmse": float(best),
            "excess": float(nrmse[pick] / best - 1),
            "pick_long_nrmse": float(nrmse_long[pick]), "refined_pick": int(pick_long),
            "refined_nrmse": float(nrmse_long[pick_long]), "best_long_nrmse": float(best_long),
            "refined_excess": float(nrmse_long[pick_long] / best_long - 1),
            "fit_pick": pick_fit, "fit_nrmse": float(nrmse_fit[pick_fit]) if pick_fit is not None else math.nan,
            "best_all_nrmse": best_all,
            "fit_excess": float(nrmse_fit[pick_fit] / best_all - 1) if pick_fit is not None else math.nan,
        }
    return out


def prepare_case(case: Case, args: argparse.Namespace) -> tuple[Path, dict, recon.Dataset, metrics.Scorer]:
    """The output folder, the case's data section (its file simulated when the case says so), the
    loaded dataset and the ground-truth scorer."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {k: (v.format(data_dir=args.data_dir, out=out) if isinstance(v, str) else v) for k, v in case.data.items()}
    if case.simulate is not None:
        write_dataset(case.simulate, data["path"])
    return out, data, recon.load_dataset(trial_plan(case, {}, data, 1).data), metrics.build_scorer(data["path"])


def run_case(name: str, case: Case, args: argparse.Namespace) -> dict:
    out, data, dataset, scorer = prepare_case(case, args)
    trials = [Trial(i, v) for i, v in enumerate(sample(case, args.trials, args.seed))]
    if args.resume:
        resume(out / f"{name}.json", trials, args)
    t0 = time.perf_counter()
    for t in trials:
        if t.short and t.long:
            continue
        plan = trial_plan(case, t.values, data, args.iterations)
        t.short = {**full_scores(plan, dataset, scorer), **halfset_scores(plan, dataset)}
        t.long = full_scores(trial_plan(case, t.values, data, args.refine_iterations), dataset, scorer)
        print(f"{name} trial {t.number}: " + json.dumps({k: round(v, 4) for k, v in t.short.items()})
              + f" long nrmse {t.long['nrmse']:.4f}", flush=True)
    for objective in ("halfset_frc_resolution_A", "halfset_frc_area"):
        for i in np.argsort(oriented(trials, objective, "short"))[:args.top_k]:
            if "halfset_frc_area" not in trials[i].long:
                long_plan = trial_plan(case, trials[i].values, data, args.refine_iterations)
                trials[i].long.update(halfset_scores(long_plan, dataset))
    if case.fit and args.fit_iterations:
        refine_fitted(name, case, trials, data, dataset, scorer, args)
    summary = {"case": name, "notes": case.notes, "trials": args.trials, "iterations": args.iterations,
               "refine_iterations": args.refine_iterations, "fit_iterations": args.fit_iterations, "top_k": args.top_k,
               "seconds": time.perf_counter() - t0, "objectives": evaluate(trials, args.top_k),
               "records": [t.__dict__ for t in trials]}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    return summary


def resume(path: Path, trials: list[Trial], args: argparse.Namespace) -> None:
    """Take the scores of an earlier run's trials (`<out>/<case>.json`) when it sampled the same settings
    at the same iterations: only what it lacks (e.g. the refinement with fitted optics) is computed."""
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    same = (earlier["iterations"], earlier["refine_iterations"]) == (args.iterations, args.refine_iterations)
    records = earlier["records"]
    if same and len(records) == len(trials) and all(r["values"] == t.values for r, t in zip(records, trials)):
        for r, t in zip(records, trials):
            t.short, t.long = r["short"], r["long"]
            t.fitted = r.get("fitted", {}) if earlier.get("fit_iterations") == args.fit_iterations else {}


def refine_fitted(name: str, case: Case, trials: list[Trial], data: dict, dataset: recon.Dataset,
                  scorer: metrics.Scorer, args: argparse.Namespace) -> None:
    """Each objective's `--top-k` short trials re-run with the case's optics fitted (their halves too for
    the half-set objectives), recorded in `Trial.fitted`."""
    for objective in OBJECTIVES:
        for i in np.argsort(oriented(trials, objective, "short"))[:args.top_k]:
            t = trials[i]
            plan = trial_plan(case, t.values, data, args.fit_iterations, case.fit)
            if not t.fitted:
                t.fitted = full_scores(plan, dataset, scorer)
                print(f"{name} trial {t.number} fitted: " + json.dumps({k: round(v, 4) for k, v in t.fitted.items()}),
                      flush=True)
            if objective.startswith("halfset") and "halfset_frc_area" not in t.fitted:
                t.fitted.update(halfset_scores(plan, dataset))


def sweep(name: str, case: Case, args: argparse.Namespace) -> None:
    """Print every score along one setting, the others fixed at `--at` (and the base plan)."""
    _, data, dataset, scorer = prepare_case(case, args)
    key, _, values = args.sweep.partition("=")
    fixed = dict(item.split("=") for item in args.at)
    for value in values.split(","):
        settings = {**{k: float(v) for k, v in fixed.items()}, key: float(value)}
        plan = trial_plan(case, settings, data, args.iterations)
        scores = {**full_scores(plan, dataset, scorer), **halfset_scores(plan, dataset)}
        print(f"{name} {key}={value}: " + " ".join(f"{k} {scores[k]:.4g}" for k in
              ("nrmse", "data_loss", "heldout_loss", "halfset_frc_resolution_A", "halfset_frc_area")), flush=True)


def table(summaries: list[dict]) -> str:
    rows = ["| case | objective | Spearman ρ (short) | pick / best NRMSE, short | excess | refined pick / best long NRMSE "
            "| excess | refined with fitted optics: pick / best of all | excess |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        for name, r in s["objectives"].items():
            rows.append(f"| {s['case']} | {name} | {r['spearman']:.2f} | {r['pick_nrmse']:.3f} / {r['best_nrmse']:.3f} "
                        f"| {100 * r['excess']:+.0f} % | {r['refined_nrmse']:.3f} / {r['best_long_nrmse']:.3f} "
                        f"| {100 * r['refined_excess']:+.0f} % | {r['fit_nrmse']:.3f} / {r['best_all_nrmse']:.3f} "
                        f"| {100 * r['fit_excess']:+.0f} % |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--refine-iterations", type=int, default=100)
    parser.add_argument("--fit-iterations", type=int, default=30,
                        help="iterations of the refinement with fitted optics (0: none)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--resume", action="store_true",
                        help="reuse the scores in <out>/<case>.json of an earlier run with the same trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    parser.add_argument("--out", default="out/truthfree")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", help="vary one plan setting instead of sampling trials")
    parser.add_argument("--at", nargs="*", default=[], metavar="KEY=VALUE", help="--sweep: settings held fixed")
    parser.add_argument("--file", help="run the case 'file' on this dataset (with a ground truth) instead of --cases")
    parser.add_argument("--patterns", default="dp_noisy/dose_1e+05", help="--file: HDF5 dataset of the patterns")
    args = parser.parse_args()
    cases = {"file": file_case(args.file, args.patterns)} if args.file else {name: CASES[name] for name in args.cases}
    if args.sweep:
        for name, case in cases.items():
            sweep(name, case, args)
        return 0
    summaries = [run_case(name, case, args) for name, case in cases.items()]
    print(table(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
