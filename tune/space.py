"""The search space: dotted paths into the plan, their Optuna distributions, and trial plans.

A search key `recon.<plan key path>` names one setting of the plan schema (`recon.plan.Plan`).
Its Optuna parameter is named by the plan key path (e.g. `probe.defocus_A`). A trial's plan is
the base plan with the sampled values set, validated anew: nothing is shared or mutated
between trials.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ValidationError

from recon.plan import Plan, PlanError, apply_overrides, model_in, plan_from_dict
from tune.schema import SearchSpec

PREFIX = "recon."


@dataclass(frozen=True)
class SearchParam:
    """One searched setting."""

    key: str  # as written in the study file, e.g. recon.probe.defocus_A
    name: str  # the plan key path and Optuna parameter name, e.g. probe.defocus_A
    distribution: BaseDistribution


def resolve_search(search: dict[str, SearchSpec], base_raw: dict[str, Any], source: str) -> tuple[SearchParam, ...]:
    """Check every search key against the plan schema and every range end / choice against the
    plan's validation; return the parameters in study-file order."""
    params = []
    for key, spec in search.items():
        where = f"{source}: search.{key}"
        if not key.startswith(PREFIX):
            raise PlanError(f"{where}: search keys are dotted paths into the plan, starting with '{PREFIX}' "
                            f"(e.g. recon.probe.defocus_A)")
        name = key[len(PREFIX):]
        kind = _kind(_annotation(name, where))
        param = SearchParam(key, name, _distribution(spec, kind, where))
        for label, value in _extremes(spec):
            _check_value(base_raw, name, value, f"{where}: {label} {value!r} is not allowed")
        params.append(param)
    return tuple(params)


def _annotation(name: str, where: str) -> Any:
    """The type annotation of the plan field at a dotted path, or a PlanError naming the allowed keys."""
    model: Any = Plan
    parts = name.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            at = ".".join(parts[:i]) or "the plan"
            raise PlanError(f"{where}: no setting {part!r} in {at}; allowed keys: {', '.join(fields)}")
        annotation = fields[part].annotation
        if i == len(parts) - 1:
            return annotation
        model = model_in(annotation)
        if model is None:
            raise PlanError(f"{where}: {'.'.join(parts[: i + 1])} is a single setting, it has no {parts[i + 1]!r}")
    raise AssertionError("unreachable")


def _kind(annotation: Any) -> str:
    """'float', 'int' or 'choice' for a searchable field; 'group' or 'tuple' otherwise."""
    is_union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    args = [a for a in (typing.get_args(annotation) if is_union else (annotation,)) if a is not type(None)]
    if any(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
        return "group"
    if any(typing.get_origin(a) is tuple for a in args):
        return "tuple"
    if any(a is float for a in args):
        return "float"
    if any(a is int for a in args) and not any(a is bool for a in args):
        return "int"
    return "choice"  # Literal, bool, str


def _distribution(spec: SearchSpec, kind: str, where: str) -> BaseDistribution:
    if kind == "group":
        raise PlanError(f"{where}: names a group of settings; search one of its keys")
    if kind == "tuple":
        raise PlanError(f"{where}: a setting with several values cannot be searched")
    if spec.choices is not None:
        return CategoricalDistribution(spec.choices)
    assert spec.low is not None and spec.high is not None
    if kind == "choice":
        raise PlanError(f"{where}: a named or on/off setting needs choices, not a range")
    if kind == "int":
        ends = (spec.low, spec.high, spec.step or 1)
        if not all(float(v).is_integer() for v in ends):
            raise PlanError(f"{where}: an integer setting needs integer low, high and step")
        low, high, step = (int(v) for v in ends)
        if (high - low) % step:
            raise PlanError(f"{where}: high - low must be a multiple of step")
        return IntDistribution(low, high, log=spec.log, step=step)
    if spec.step is not None and not math.isclose(round((spec.high - spec.low) / spec.step) * spec.step, spec.high - spec.low):
        raise PlanError(f"{where}: high - low must be a multiple of step")
    return FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)


def _extremes(spec: SearchSpec) -> list[tuple[str, Any]]:
    if spec.choices is not None:
        return [("choice", c) for c in spec.choices]
    return [("low", spec.low), ("high", spec.high)]


def _check_value(base_raw: dict[str, Any], name: str, value: Any, what: str) -> None:
    try:
        Plan.model_validate(apply_overrides(base_raw, {name: value}))
    except ValidationError as err:
        e = err.errors()[0]
        msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "allowed values are" if e["type"] == "literal_error" else "it should be")
        raise PlanError(f"{what}: {msg}") from None


def grid(params: tuple[SearchParam, ...]) -> dict[str, list[Any]] | None:
    """The grid of every parameter (for the grid sampler), or None if a range has no step."""
    out: dict[str, list[Any]] = {}
    for p in params:
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            out[p.name] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            out[p.name] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = round((d.high - d.low) / d.step)
            out[p.name] = [d.low + i * d.step for i in range(n + 1)]
        else:
            return None
    return out


def suggest(trial: optuna.Trial, params: tuple[SearchParam, ...]) -> dict[str, Any]:
    """Ask the trial for a value of every parameter; returns {plan key path: value}."""
    values: dict[str, Any] = {}
    for p in params:
        d = p.distribution
        if isinstance(d, FloatDistribution):
            values[p.name] = trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, IntDistribution):
            values[p.name] = trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
        else:
            assert isinstance(d, CategoricalDistribution)
            values[p.name] = trial.suggest_categorical(p.name, d.choices)
    return values


def trial_plan(base: Plan, values: dict[str, Any], source: str = "<trial>") -> Plan:
    """A new, validated plan: the base plan with `values` ({plan key path: value}) set."""
    return plan_from_dict(apply_overrides(base.model_dump(mode="json"), values), source)

