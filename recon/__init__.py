"""recon: JAX electron ptychography engine that compiles once per study.

Public API: load_plan / plan_from_dict (validated plans), load_dataset, reconstruct (and reconstruct_batch: K plans as one program), Result /
load_result, compile_count, and the simulate module for datasets with known ground truth.
"""
from .data import Dataset, load_dataset
from .engine import compile_count
from .plan import Plan, PlanError, load_plan, plan_from_dict
from .result import Result, load_result
from .lower import static_key
from .run import Progress, reconstruct, reconstruct_batch

__all__ = ["Dataset", "Plan", "PlanError", "Progress", "Result", "compile_count", "load_dataset", "load_plan",
           "load_result", "plan_from_dict", "reconstruct", "reconstruct_batch", "static_key"]
