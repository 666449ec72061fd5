"""Plot the subject-aware sharing study: subject consistency against background diversity, and the pick.

    PYTHONPATH=. python scripts/plot_study.py outputs/consistency/run-0001/results.csv \\
        --out assets/consistency-v2/pareto.png

Reads the results.csv of a `--world v2` run of scripts/eval_consistency.py (and timing.csv beside it),
and writes a PNG: one labelled point per configuration at (agreement, bg_diversity), each the mean
over seeds; its prompt alignment (acc_specified) by the point and as its colour (blue as 'off', red 0.1
or more below); the Pareto front ringed and joined; the recommended configuration boxed. It prints the
means, the front and the recommended configuration. Drawn with PIL (no matplotlib); the same input
always gives the same bytes. An existing --out is refused unless --force.

How the recommended setting is picked (written down before any result of the study was seen; the
code is `ldm.eval.study_plot.recommend`):

    Among the sharing configurations (not 'off') on the Pareto front of subject consistency
    (agreement, higher is better) against background diversity (bg_diversity, higher is better),
    each the mean over seeds, keep those whose prompt alignment is within 0.05 of 'off' on both
    acc_subject and acc_specified (mean over seeds, no lower than off's minus 0.05); recommend the
    one with the highest agreement. Ties (equal agreement to 3 decimals): the lower sec_per_image of
    timing.csv, then the earlier in the run's order. If none qualifies, nothing is recommended. The
    cost at 512 px of the recommended setting is then read from benchmarks/shared_attention_cost.py
    and reported as it is.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.cli import ArgumentParser, UsageError, run_cli  # noqa: E402
from ldm.eval.study_plot import draw_study, pareto_front, read_means, recommend  # noqa: E402

FLAGS = {"results": "RESULTS"}


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.csv of a --world v2 run of scripts/eval_consistency.py")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    opt = parser.parse_args(argv)
    results, out = Path(opt.results), Path(opt.out)
    if not results.is_file():
        raise UsageError(f"RESULTS {results}: no such file; give the results.csv of a --world v2 run")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: give a .png file name")
    if out.exists() and not opt.force:
        raise UsageError(f"--out {out} already exists; pass --force to replace it or choose another name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist; create it first")
    points = read_means(results)
    if not any(p.name == "off" for p in points):
        raise UsageError(f"RESULTS {results}: has no 'off' rows, which the rule needs to judge prompt alignment; "
                         "run the study with 'off' among --configs")
    chosen = recommend(points)
    image = draw_study(points, title=str(results.parent.name))
    front = pareto_front(points)
    print(f"{'configuration':<24} {'agreement':>9} {'bg_div':>7} {'acc_subj':>8} {'acc_spec':>8} {'s/img':>7} front")
    for p in points:
        cells = [f"{v:.3f}" if not math.isnan(v) else "-" for v in (p.x, p.y, p.acc_subject, p.acc_specified)]
        cost = "-" if math.isnan(p.sec_per_image) else f"{p.sec_per_image:.3f}"
        print(f"{p.name:<24} {cells[0]:>9} {cells[1]:>7} {cells[2]:>8} {cells[3]:>8} {cost:>7} "
              f"{'yes' if p.name in front else ''}")
    print(f"recommended: {chosen if chosen is not None else 'none (no configuration qualifies)'}")
    image.save(out, format="PNG")
    print(f"wrote {out}")
    return chosen


if __name__ == "__main__":
    run_cli(main, flags=FLAGS)
