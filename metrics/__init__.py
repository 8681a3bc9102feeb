"""Scoring of ptychographic reconstructions against ground truth, and objectives without it.

Does not import ``recon`` or ``tune``: results are read from their HDF5 layout, duck-typed objects
or plain arrays.
"""

from .errors import ScoringError
from .frc import FRCCurve, frc, half_bit_threshold
from .io import GroundTruth, Reconstruction, final_data_loss, heldout_loss, load_reconstruction
from .scorer import Alignment, ScoreOptions, Scorer, ScoreReport, align, score

__all__ = [
    "Alignment",
    "FRCCurve",
    "GroundTruth",
    "Reconstruction",
    "ScoreOptions",
    "ScoreReport",
    "Scorer",
    "ScoringError",
    "align",
    "final_data_loss",
    "frc",
    "half_bit_threshold",
    "heldout_loss",
    "load_reconstruction",
    "score",
]
