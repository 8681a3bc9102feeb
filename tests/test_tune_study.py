"""The study file: schema validation, search-path resolution, samplers and pruners, budget counting.

Fast unit tests (no reconstruction). Validation errors must be one line naming the file and the
key path, exit status 2 without a traceback, and must leave nothing in the storage.
"""
from __future__ import annotations

import io
import signal
import subprocess
import warnings
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from recon.plan import Plan, PlanError
from tune import budget
from tune.cli import main
from tune.notices import silence_deliberate_notices
from tune.objective import keep_best_results, trial_stem
from tune.launch import worker_slots
from tune.progress import TrialProgress, eta_s
from tune.record import TrialRecord
from tune.space import suggest
from tune.storage import open_storage
from tune.schema import PrunerSpec
from tune.strategy import build_pruner, build_sampler, worker_seed
from tune.study import load_study, storage_url
from tune.worker import join_study

GOOD = """\
study: {name: s1, n_trials: 4}
data: {simulate: {pattern_px: 16, scan_shape: [4, 4]}}
recon: {iterations: 3, probe: {defocus_A: -50}}
search:
  recon.probe.defocus_A: {low: -200, high: 0}
  recon.optimizers.object.learning_rate: {low: 1.0e-3, high: 1, log: true}
  recon.noise_model.name: {choices: [amplitude, poisson]}
  recon.object.slices: {low: 1, high: 3}
"""


def write(tmp_path: Path, text: str, name: str = "study.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def with_search(search: str, extra: str = "") -> str:
    return ("study: {name: s1, n_trials: 4}\ndata: {simulate: {pattern_px: 16, scan_shape: [4, 4]}}\n"
            f"search: {search}\n{extra}")


def test_good_study_resolves(tmp_path):
    config = load_study(write(tmp_path, GOOD))
    assert config.storage_url == f"sqlite:///{tmp_path / 'study.db'}"
    assert config.output_dir == tmp_path / "out" / "s1"
    assert config.data_path.parent == config.output_dir and config.data_path.suffix == ".h5"
    assert config.directions == ("minimize",) and config.pruner.name == "median" and config.budget == 4
    dists = {p.name: p.distribution for p in config.params}
    assert dists["probe.defocus_A"] == FloatDistribution(-200, 0)
    assert dists["optimizers.object.learning_rate"] == FloatDistribution(1e-3, 1, log=True)
    assert dists["noise_model.name"] == CategoricalDistribution(("amplitude", "poisson"))
    assert dists["object.slices"] == IntDistribution(1, 3)
    assert config.base_plan.probe.defocus_A == -50 and config.base_plan.data.path == str(config.data_path)


@pytest.mark.parametrize("text, expected", [
    (with_search("{recon.probe.defocsu_A: {low: 0, high: 1}}"),
     "search.recon.probe.defocsu_A: no setting 'defocsu_A' in probe; allowed keys: energy_eV, semiangle_mrad, defocus_A"),
    (with_search("{recon.probe.semiangle_mrad: {low: 0, high: 30}}"),
     "search.recon.probe.semiangle_mrad: low 0.0 is not allowed: it should be greater than 0"),
    (with_search("{recon.probe.defocus_A: {low: 10, high: 1}}"), "search.recon.probe.defocus_A: empty range"),
    (with_search("{recon.regularizers.object_tv: {low: 0, high: 1, log: true}}"),
     "search.recon.regularizers.object_tv: a log range needs low > 0"),
    (with_search("{recon.regularizers.object_tv: {low: -1, high: 1, log: true}}"), "a log range needs low > 0"),
    (with_search("{recon.noise_model.name: {choices: [amplitude, gauss]}}"),
     "search.recon.noise_model.name: choice 'gauss' is not allowed: allowed values are 'amplitude', 'anscombe'"),
    (with_search("{recon.noise_model.name: {choices: []}}"), "search.recon.noise_model.name: choices is empty"),
    (with_search("{recon.noise_model.name: {low: 0, high: 1}}"), "needs choices, not a range"),
    (with_search("{recon.noise_model: {low: 0, high: 1}}"), "names a group of settings"),
    (with_search("{recon.scan.affine: {low: 0, high: 1}}"), "cannot be searched"),
    (with_search("{probe.defocus_A: {low: 0, high: 1}}"), "starting with 'recon.'"),
    (with_search("{recon.object.slices: {low: 1.5, high: 3}}"), "integer low, high and step"),
    (with_search("{recon.probe.defocus_A: {lo: 1, high: 3}}"),
     "search.recon.probe.defocus_A.lo: unknown key; allowed keys: low, high, log, step, choices"),
    (with_search("{}"), "search: "),
    (with_search("{recon.probe.defocus_A: {low: 1, high: 3}}", "recon: {probe: {defocus: 3}}"),
     "recon.probe.defocus: unknown key; allowed keys: energy_eV"),
    (with_search("{recon.probe.defocus_A: {low: 1, high: 3}}", "objective: {metrics: [nrmse, psnr]}"),
     "objective.metrics.1: allowed values are 'nrmse', 'mse', 'frc_resolution_A'"),
    (with_search("{recon.probe.defocus_A: {low: 1, high: 3}}", "objective: {metrics: [nrmse, runtime_s]}\n"
                 "study: {name: s1, n_trials: 4, pruner: {name: median}}"),
     "study.pruner: pruning needs a single objective metric"),
    (with_search("{recon.probe.defocus_A: {low: 1, high: 3}}", "objective: {metrics: [heldout_loss]}"),
     "data.heldout_fraction: heldout_loss needs held-out positions"),
    ("study: {name: s1, n_trials: 4, pruner: {name: percentile}}\ndata: {simulate: {}}\n"
     "search: {recon.probe.defocus_A: {low: 1, high: 3}}",
     "study.pruner.options: PercentilePruner.__init__() missing 1 required positional argument: 'percentile'"),
    ("study: {name: s1, n_trials: 4, sampler: {name: tpe, options: {n_startup: 3}}}\ndata: {simulate: {}}\n"
     "search: {recon.probe.defocus_A: {low: 1, high: 3}}", "allowed options: consider_prior"),
    ("study: {name: s1, n_trials: 4, sampler: {name: grid}}\ndata: {simulate: {}}\n"
     "search: {recon.probe.defocus_A: {low: 1, high: 3}}", "the grid sampler needs choices"),
    ("study: {name: s1, n_trials: 4, smapler: {name: tpe}}\ndata: {simulate: {}}\n"
     "search: {recon.probe.defocus_A: {low: 1, high: 3}}", "study.smapler: unknown key; allowed keys: name, storage"),
    ("study: {name: s1, n_trials: 0}\ndata: {simulate: {}}\nsearch: {recon.probe.defocus_A: {low: 1, high: 3}}",
     "study.n_trials: Input should be greater than or equal to 1"),
    ("study: {name: s1, n_trials: 2}\ndata: {path: x.h5, simulate: {}}\nsearch: {recon.seed: {low: 1, high: 3}}",
     "data: give exactly one of data.path or data.simulate"),
    ("study: {name: s1, n_trials: 2}\ndata: {simulate: {}}\nrecon: {data: {path: x.h5}}\n"
     "search: {recon.seed: {low: 1, high: 3}}", "recon.data: give the data at the top level"),
    ("study: [1, 2", "invalid YAML"),
])
def test_validation_errors_name_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(PlanError) as err:
        load_study(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert expected in message, message


def test_a_partial_group_keeps_the_plan_defaults(tmp_path):
    """optimizers.object: {name: adam, learning_rate: 0.05} must not turn the cosine schedule into constant."""
    extra = ("recon: {optimizers: {object: {name: adam, learning_rate: 0.05}},"
             " constraints: {position_recentering: {start: 5}}}")
    config = load_study(write(tmp_path, with_search("{recon.probe.defocus_A: {low: 1, high: 3}}", extra)))
    plan, default = config.base_plan, Plan.model_validate({"data": {"path": "x.h5"}})
    assert plan.optimizers.object == default.optimizers.object.model_copy(update={"learning_rate": 0.05})
    assert plan.optimizers.object.schedule == "cosine" and plan.optimizers.probe == default.optimizers.probe
    assert plan.constraints.position_recentering.enabled and plan.constraints.position_recentering.start == 5


def test_missing_data_file_and_keys_are_reported(tmp_path):
    from tune.study import check_data

    config = load_study(write(tmp_path, "study: {name: s1, n_trials: 2}\ndata: {path: nothere.h5}\n"
                                        "search: {recon.seed: {low: 1, high: 3}}"))
    with pytest.raises(PlanError, match="data.path: no such file"):
        check_data(config)
    import h5py

    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["dp"] = [[0.0]]
    config = load_study(write(tmp_path, "study: {name: s1, n_trials: 2}\ndata: {path: d.h5}\n"
                                        "search: {recon.seed: {low: 1, high: 3}}"))
    with pytest.raises(PlanError, match="data.ground_truth: no dataset 'ground_truth/phase_sum'"):
        check_data(config)


@pytest.mark.parametrize("text", [
    with_search("{recon.probe.defocus_A: {low: 10, high: 1}}"),
    "study: {name: s1, n_trials: 2}\ndata: {path: missing.h5}\nsearch: {recon.seed: {low: 1, high: 3}}",
])
@pytest.mark.parametrize("command", ["start", "worker"])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, text, command, capsys, signals_restored):
    """In this process (an exception escaping `main` fails the test as a traceback would); the
    `python -m tune` entry point itself is checked by the help and status tests."""
    path = write(tmp_path, text)
    assert main([command, str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert out == ""
    assert not (tmp_path / "study.db").exists()  # nothing written to storage
    assert not (tmp_path / "out").exists()


@pytest.fixture
def signals_restored():
    """`tune worker` run in this process installs its SIGINT/SIGTERM handlers: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_cli_help_documents_every_command():
    run = subprocess.run([sys.executable, "-m", "tune", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for command in ("start", "worker", "status", "best", "recon", "report", "dashboard", "score"):
        assert f"tune {command}" in run.stdout
    run = subprocess.run([sys.executable, "-m", "tune", "start", "--help"], capture_output=True, text=True, timeout=60)
    assert "--workers" in run.stdout and "--devices" in run.stdout


def test_only_deliberate_optuna_notices_are_silenced(tmp_path):
    config = load_study(write(tmp_path, GOOD))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_deliberate_notices()
        join_study(config, open_storage(config.storage_url, 1, 2, 1), 0)  # heartbeats, retries, metric names
        build_pruner(PrunerSpec(name="wilcoxon"))  # a study file's choice: its notice stays
    assert [type(w.message).__name__ for w in caught] == ["ExperimentalWarning"]
    assert "WilcoxonPruner" in str(caught[0].message)


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("tune (ptytune) ")


def test_eta_comes_from_the_rate_trials_finished_since_the_start():
    assert eta_s(finished=5, finished_at_start=2, budget_size=12, elapsed_s=30.0) == pytest.approx(70.0)
    assert eta_s(finished=2, finished_at_start=2, budget_size=12, elapsed_s=30.0) is None


def _progress_output(tmp_path, terminal: bool) -> str:
    config = load_study(write(tmp_path, GOOD))
    study = optuna.create_study(directions=["minimize"])
    for number, value in enumerate((0.3, 0.2, 0.25)):
        study.add_trial(create_trial(value=value, params={"probe.defocus_A": -10.0 * number},
                                     distributions={"probe.defocus_A": FloatDistribution(-200, 0)}))
    out = io.StringIO()
    progress = TrialProgress(config, finished_at_start=1, file=out, terminal=terminal)
    progress.update(study)
    progress.close()
    return out.getvalue()


@pytest.mark.parametrize("columns", [100, 40])
def test_progress_fits_the_terminal(tmp_path, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    lines = _progress_output(tmp_path, terminal=True).split("\r")
    assert max(len(line) for line in lines) < columns
    shown = next(line for line in lines if line.startswith("3/4 "))
    assert "elapsed " in shown and "ETA " in shown
    assert ("best nrmse 0.2 (trial 1)" in shown) == (columns == 100)


def test_progress_without_a_terminal_is_plain_lines(tmp_path):
    text = _progress_output(tmp_path, terminal=False)
    assert "\r" not in text and text.count("\n") == 1
    assert text.startswith("3/4 trials: 3 complete") and "best nrmse 0.2 (trial 1)" in text and ", ETA " in text


def test_status_of_unknown_study_is_a_user_error(tmp_path):
    path = write(tmp_path, GOOD)
    run = subprocess.run([sys.executable, "-m", "tune", "status", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith("error: no study yet")
    assert not (tmp_path / "study.db").exists()


def test_storage_urls_resolve_beside_the_study_file(tmp_path):
    study = tmp_path / "sub" / "x.yml"
    assert storage_url(None, study) == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert storage_url("sqlite:///../y.db", study) == f"sqlite:///{tmp_path / 'y.db'}"
    assert storage_url("sqlite:////abs/z.db", study) == "sqlite:////abs/z.db"
    assert storage_url("postgresql+psycopg2://u@h/db", study) == "postgresql+psycopg2://u@h/db"
    assert storage_url("postgresql://u@h/db", study).endswith("://u@h/db")  # with a driver that is installed


@pytest.mark.parametrize("name, cls", [
    ("tpe", "TPESampler"), ("cmaes", "CmaEsSampler"), ("random", "RandomSampler"), ("qmc", "QMCSampler"),
    ("nsga2", "NSGAIISampler"), ("grid", "GridSampler"), ("gp", "GPSampler"),
])
def test_every_sampler_builds(tmp_path, name, cls):
    if name == "gp":
        pytest.importorskip("torch", reason="the gp sampler needs PyTorch")
    if name == "cmaes":
        pytest.importorskip("cmaes", reason="the cmaes sampler needs the cmaes package")
    search = "{recon.probe.defocus_A: {low: -100, high: 0, step: 50}, recon.noise_model.name: {choices: [amplitude, poisson]}}"
    text = with_search(search).replace("n_trials: 4}", f"n_trials: 4, sampler: {{name: {name}, seed: 3}}}}")
    config = load_study(write(tmp_path, text))
    sampler = build_sampler(config.spec.study.sampler, config.params, 1, 0)
    assert type(sampler).__name__ == cls
    if name == "grid":
        assert config.budget == 4  # 3 defocus values x 2 noise models = 6 > n_trials


@pytest.mark.parametrize("pruner, cls", [
    ("{name: none}", "NopPruner"), ("{name: median, options: {n_startup_trials: 2}}", "MedianPruner"),
    ("{name: percentile, options: {percentile: 25}}", "PercentilePruner"),
    ("{name: successive_halving}", "SuccessiveHalvingPruner"), ("{name: hyperband, options: {min_resource: 2}}", "HyperbandPruner"),
    ("{name: wilcoxon}", "WilcoxonPruner"), ("{name: threshold, options: {upper: 1.0}}", "ThresholdPruner"),
    ("{name: patient, options: {patience: 2}, wrapped: {name: median}}", "PatientPruner"),
])
def test_every_pruner_builds(tmp_path, pruner, cls):
    text = with_search("{recon.probe.defocus_A: {low: 1, high: 3}}").replace("n_trials: 4}", f"n_trials: 4, pruner: {pruner}}}")
    config = load_study(write(tmp_path, text))
    assert type(build_pruner(config.pruner)).__name__ == cls


def test_multi_objective_defaults_to_no_pruning(tmp_path):
    config = load_study(write(tmp_path, with_search("{recon.probe.defocus_A: {low: 1, high: 3}}",
                                                    "objective: {metrics: [nrmse, runtime_s, ssim]}")))
    assert config.pruner.name == "none" and config.directions == ("minimize", "minimize", "maximize")


def test_worker_seeds_differ_and_are_reproducible():
    seeds = [worker_seed(7, i, 0) for i in range(4)]
    assert len(set(seeds)) == 4 and seeds == [worker_seed(7, i, 0) for i in range(4)]
    assert worker_seed(7, 0, 0) != worker_seed(7, 0, 12)  # a worker started again on a resumed study
    assert worker_seed(None, 0, 0) is None and worker_seed(7, None, 0) != worker_seed(7, None, 0)


def test_a_worker_started_again_draws_new_settings(tmp_path):
    """Ctrl-C and `tune start` again: the new worker 0 must not replay the first worker 0's samples."""
    config = load_study(write(tmp_path, GOOD))
    storage = open_storage(config.storage_url)
    drawn = []
    for _start in range(2):
        study = join_study(config, storage, 0)
        for _ in range(3):
            trial = study.ask()
            drawn.append(tuple(suggest(trial, config.params).values()))
            study.tell(trial, 1.0)
    assert len(set(drawn)) == len(drawn) == 6


def test_worker_slots_spread_over_devices():
    slots = worker_slots(["0", "1"], 4)
    assert [s.device for s in slots] == ["0", "1", "0", "1"] and all(s.shares_device for s in slots)
    slots = worker_slots(["0", "0", "1"], None)
    assert [(s.device, s.shares_device) for s in slots] == [("0", True), ("0", True), ("1", False)]
    assert [s.device for s in worker_slots([], 3)] == [None, None, None]


def _trial(number: int, state: TrialState, **system_attrs) -> optuna.trial.FrozenTrial:
    values = {"value": 1.0} if state == TrialState.COMPLETE else {}
    t = create_trial(state=state, **values, system_attrs=system_attrs,
                     user_attrs=TrialRecord(surplus=system_attrs.pop("surplus", False)).model_dump(exclude_defaults=True))
    t.number = number
    return t


def test_only_the_best_result_files_are_kept(tmp_path):
    """output.keep: best. The file of a trial failed while its worker went on saving it goes too."""
    study = optuna.create_study()
    states = [(TrialState.COMPLETE, 0.5), (TrialState.COMPLETE, 0.2), (TrialState.FAIL, None), (TrialState.RUNNING, None)]
    for number, (state, value) in enumerate(states):
        study.add_trial(create_trial(state=state, value=value))
        (tmp_path / f"{trial_stem(number)}.h5").write_bytes(b"")
    keep_best_results(study, tmp_path)
    assert sorted(p.stem for p in tmp_path.iterdir()) == [trial_stem(1), trial_stem(3)]  # the best, and one running


def test_budget_counts_requeued_and_surplus_trials_once():
    trials = [
        _trial(0, TrialState.COMPLETE), _trial(1, TrialState.PRUNED),
        _trial(2, TrialState.FAIL),  # worker killed: re-queued as trial 5
        _trial(3, TrialState.FAIL),  # an exception: counts
        _trial(4, TrialState.RUNNING),
        _trial(5, TrialState.WAITING, failed_trial=2, retry_history=[2]),
        _trial(6, TrialState.FAIL, surplus=True),
    ]
    c = budget.count(trials)
    assert (c.complete, c.pruned, c.failed, c.running, c.waiting, c.requeued, c.surplus) == (1, 1, 1, 1, 1, 1, 1)
    assert c.finished == 3 and c.used == 5
    assert budget.count(trials, below=4).used == 3
