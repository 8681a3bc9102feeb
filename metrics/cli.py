"""``tune score RESULT.h5 --ground-truth DATA.h5``: print the scores as JSON, optionally a figure."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, NoReturn, Sequence

from .errors import ScoringError
from .figure import save_score_figure
from .io import GROUND_TRUTH_KEY
from .scorer import build_scorer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ScoringError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tune score", description="Score a reconstruction result against a ground truth.")
    p.add_argument("result", help="reconstruction result HDF5 (/object, attrs dx_A, origin_yx_A)")
    p.add_argument("--ground-truth", required=True, help="dataset HDF5 with /ground_truth and /scan")
    p.add_argument("--key", default=GROUND_TRUTH_KEY, help="ground-truth dataset (default: %(default)s)")
    p.add_argument("--out", help="write the score figure (PNG) here")
    p.add_argument("--margin-A", type=float, default=0.0, help="grow the region of interest by this many Å")
    p.add_argument("--roi", choices=("scan", "full"), default="scan", help="region of interest (default: scan)")
    p.add_argument("--per-slice", action="store_true", help="also score each slice against sigma*V_slices")
    return p


def json_safe(scores: dict[str, Any]) -> dict[str, Any]:
    """Scores with NaN and ±inf replaced by None (strict JSON)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in scores.items()}


def score_main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on bad input (one ``error: ...`` line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        scorer = build_scorer(args.ground_truth, args.key, roi=args.roi, margin_A=args.margin_A)
        report = scorer.report(args.result, per_slice=args.per_slice)
        if args.out:
            save_score_figure(args.out, report, title=f"{args.result} vs {args.ground_truth}:{args.key}")
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (ScoringError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(report.scores), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(score_main())
