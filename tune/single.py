"""`tune recon`: one reconstruction from a plan file, with a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

import metrics
import recon
from recon.plan import PlanError
from tune.schema import ScoringSpec


def run_plan(path: Path, iterations: int | None = None, data: str | None = None, out: Path | None = None,
             scoring: ScoringSpec | None = None, ground_truth: str = metrics.GROUND_TRUTH_KEY) -> int:
    """Run the plan, save the result, print a summary (and scores); 0 on success, 1 if it diverged."""
    overrides: dict[str, Any] = {}
    if iterations is not None:
        overrides["iterations"] = iterations
    if data is not None:
        overrides.update({"data.path": str(Path(data).expanduser().resolve()), "data.simulate": None})
    plan = recon.load_plan(path, overrides)
    if plan.data.path is not None and not Path(plan.data.path).is_file():
        raise PlanError(f"{path}: data.path: no such file: {plan.data.path}")
    if scoring is not None and plan.data.path is None:
        raise PlanError(f"{path}: --score needs data.path: a data file with a ground truth")
    scorer = _scorer(plan.data.path, ground_truth, scoring, path) if scoring is not None else None
    dataset = recon.load_dataset(plan.data)

    with tqdm(total=plan.iterations, desc="recon", unit="it", dynamic_ncols=True) as bar:
        def progress(p: Any) -> None:
            bar.update(p.iteration - bar.n)
            bar.set_postfix(loss=f"{p.loss:.4g}", refresh=False)

        result = recon.reconstruct(plan, dataset=dataset, callback=progress)
    target = result.save(out or default_result_path(path))
    print(f"{result.iterations_done} iterations ({result.stop_reason}); compile {result.compile_s:.1f} s, "
          f"run {result.run_s:.1f} s; final data loss {result.final_data_loss:.6g}; saved {target}")
    for key, value in result.fitted.items():
        print(f"fitted {key} = {value:.6g} ± {result.fitted_stderr.get(key, math.nan):.2g}")
    if result.diverged:
        print(f"warning: the reconstruction diverged: {result.stop_reason}")
        return 1
    if scorer is not None:
        scores = {k: v for k, v in scorer.score(result).items() if isinstance(v, (int, float))}
        print(json.dumps({k: v if math.isfinite(v) else None for k, v in scores.items()}, indent=2))
    return 0


def default_result_path(plan_path: Path) -> Path:
    """Where `tune recon` saves a result without --out: out/<plan stem>_result.h5 beside the plan file."""
    return plan_path.resolve().parent / "out" / f"{plan_path.stem}_result.h5"


def _scorer(data_path: str, key: str, scoring: ScoringSpec, plan_path: Path) -> metrics.Scorer:
    try:
        return metrics.build_scorer(data_path, key, **scoring.model_dump())
    except metrics.ScoringError as err:
        raise PlanError(f"{plan_path}: --ground-truth: {err}") from None
