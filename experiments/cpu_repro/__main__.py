"""``python -m experiments.cpu_repro [--quick] [--out DIR] [--only E1,E2,E4,E6] [--workers N]``.

Full mode (default): results in ``experiments/cpu_repro/results/`` and ``experiments/cpu_repro/REPORT.md``
(about 15 min on 2 cores). ``--quick``: tiny settings for a smoke test (seconds), written to ``--out``
(default: a folder in the system temp dir, so a quick run never overwrites the full results).
``--report-only`` rebuilds REPORT.md and the plots from ``results/all_results.json``.
``--lr-pilot`` runs the learning-rate pilot that fixed the E4 learning rates.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.cpu_repro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    ap.add_argument("--out", default=None, help="output folder (REPORT.md and results/ go inside)")
    ap.add_argument("--only", default=None, help="comma-separated subset of E1,E2,E4,E6")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes, 1 thread each (default: 2 in full mode, 1 with --quick)")
    ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    ap.add_argument("--report-only", action="store_true", help="rebuild REPORT.md and plots from saved results")
    ap.add_argument("--lr-pilot", action="store_true", help="run the E4 learning-rate pilot instead")
    args = ap.parse_args(argv)

    from .common import save_json, setup_threads
    from .config import FULL, QUICK
    from .report import build_report
    from .runner import run_all

    conf = copy.deepcopy(QUICK if args.quick else FULL)
    if args.seeds:
        conf["seeds"] = conf["vit"]["seeds"] = args.seeds
    out = args.out or (os.path.join(tempfile.gettempdir(), "randlora_cpu_repro_quick") if args.quick else HERE)
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    raw_path = os.path.join(out, "results", "all_results.json")
    only = None if not args.only else {x.strip().upper() for x in args.only.split(",")}
    workers = args.workers or (1 if args.quick else min(2, os.cpu_count() or 1))
    setup_threads()

    if args.report_only:
        with open(raw_path) as f:
            res = json.load(f)
        conf = res["conf"]
    elif args.lr_pilot:
        res = run_all(conf, out, workers, lr_pilot=True)
        rows = res["lr_pilot"]
        best = {}
        for r in rows:
            fam = r["method"].split("-")[0]
            best.setdefault(fam, {}).setdefault(r["lr"], []).append(r["test_acc"])
        print("validation accuracy per LR (mean over the pilot's methods and shot settings):")
        for fam, d in best.items():
            print(f"  {fam:9s} " + "  ".join(f"{lr:g}: {sum(v) / len(v):.3f}" for lr, v in sorted(d.items())))
        save_json(os.path.join(out, "results", "lr_pilot.json"), {"rows": rows, "timings": res["timings"]})
        return 0
    else:
        t0 = time.time()
        res = run_all(conf, out, workers, only=only)
        res["conf"] = conf
        res["quick"] = args.quick
        res["timings"]["total_wall_s"] = round(time.time() - t0, 1)
        save_json(raw_path, res)
    text, claims = build_report(res, conf, out, quick=bool(res.get("quick")))
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(out, 'REPORT.md')} and {os.path.join(out, 'results')}/ "
          f"({res['timings'].get('total_wall_s', 0):.0f} s)")
    for cid, _, _, meas, v in claims:
        print(f"  {cid}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
