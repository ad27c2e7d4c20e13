"""``python -m randlora.report``: the command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .collect import ReportError
from .document import DEFAULT_BASELINE, write_report
from .stats import DEFAULT_METRIC
from .wandb_runs import collect_wandb


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m randlora.report",
                                description="Tables, paired comparisons and plots from the results.json of "
                                            "training jobs.")
    p.add_argument("folders", nargs="*", help="run or multirun folders, searched recursively")
    p.add_argument("--out", default=None, help="output folder (default: <first folder>/report/)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"metric to tabulate (default: {DEFAULT_METRIC})")
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help=f"method the others are compared with (default: {DEFAULT_BASELINE})")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--wandb-group", default=None, help="also pull the runs of this W&B group")
    p.add_argument("--wandb-project", default=None, help="W&B project ([entity/]project) of --wandb-group")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (optional)")
    args = p.parse_args(argv)
    if not args.folders and not args.wandb_group:
        p.print_usage(sys.stderr)
        print("error: give at least one folder or --wandb-group", file=sys.stderr)
        return 2
    try:
        extra = []
        if args.wandb_group:
            if not args.wandb_project:
                raise ReportError("--wandb-group needs --wandb-project")
            extra = collect_wandb(args.wandb_group, args.wandb_project, args.wandb_entity)
        md = write_report(args.folders, args.out, args.metric, rows=extra, baseline=args.baseline,
                          plots=not args.no_plots)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    out = args.out or ((Path(args.folders[0]).parent if Path(args.folders[0]).is_file()
                        else Path(args.folders[0])) / "report")
    print(f"\nReport written to {out}", file=sys.stderr)
    return 0
