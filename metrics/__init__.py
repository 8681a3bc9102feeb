"""Scoring of ptychographic reconstructions against ground truth, and objectives without it.

Does not import ``recon`` or ``tune``: results are read from their HDF5 layout, duck-typed objects
or plain arrays.
"""

from .errors import ScoringError
from .frc import FRCCurve, frc, half_bit_threshold
from .io import GROUND_TRUTH_KEY, GroundTruth, Reconstruction, final_data_loss, heldout_loss, load_reconstruction
from .scorer import Alignment, ScoreOptions, Scorer, ScoreReport, align, build_scorer, score

__all__ = [
    "GROUND_TRUTH_KEY",
    "Alignment",
    "FRCCurve",
    "GroundTruth",
    "Reconstruction",
    "ScoreOptions",
    "ScoreReport",
    "Scorer",
    "ScoringError",
    "align",
    "build_scorer",
    "final_data_loss",
    "frc",
    "half_bit_threshold",
    "heldout_loss",
    "load_reconstruction",
    "score",
]
