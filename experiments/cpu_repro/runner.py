"""Runs the reproduction: schedules independent work units over worker processes, gathers results."""
from __future__ import annotations

import copy
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from . import matrix
from .common import save_csv, save_json, setup_threads


def _init_worker():
    setup_threads(1)


def _unit(kind: str, args: tuple):
    """One independent piece of work (runs in a worker process or inline)."""
    t0 = time.time()
    if kind == "E1":
        out = {"rows": matrix.run_e1(args[0])}
    elif kind == "E2":
        out = {"rows": matrix.run_e2(args[0])}
    elif kind == "E6m":
        out = {"rows": matrix.run_e6_matrix(args[0])}
    elif kind == "E4":
        from .e4 import run_unit
        from .vit import make_tasks
        task, shots, pre_state, cfg, methods = args
        out = run_unit(task, shots, pre_state, make_tasks(), cfg, methods)
    elif kind == "E6v":
        from .e4 import run_e6_unit
        from .vit import make_tasks
        task, shots, pre_state, cfg = args
        out = run_e6_unit(task, shots, pre_state, make_tasks(), cfg)
    elif kind == "LR":
        from .e4 import run_unit
        from .vit import make_tasks
        task, shots, pre_state, cfg, methods = args
        out = run_unit(task, shots, pre_state, validation_tasks(make_tasks(), task), cfg, methods)
    else:
        raise ValueError(kind)
    out["seconds"] = round(time.time() - t0, 1)
    return kind, out


def validation_tasks(data: dict, task: str, n_val: int = 110) -> dict:
    """The task's pool split into a training part and a validation part (used as the 'test' set)."""
    import torch

    tk = data["tasks"][task]
    g = torch.Generator().manual_seed(99)
    p = torch.randperm(tk["x_pool"].shape[0], generator=g)
    v, tr = p[:n_val], p[n_val:]
    return {"tasks": {task: {"x_pool": tk["x_pool"][tr], "y_pool": tk["y_pool"][tr],
                             "x_test": tk["x_pool"][v], "y_test": tk["y_pool"][v]}}}


def run_all(conf: dict, out_dir: str, workers: int, only: set[str] | None = None, lr_pilot: bool = False,
            log=print) -> dict:
    from .e4 import method_table, pretrain
    from .vit import make_tasks

    res_dir = os.path.join(out_dir, "results")
    os.makedirs(res_dir, exist_ok=True)
    t_start = time.time()
    timings: dict = {}
    want = (lambda k: only is None or k in only)
    vit = conf["vit"]
    units: list[tuple[str, tuple]] = []
    pre = None
    methods = None
    if want("E4") or want("E6") or lr_pilot:
        setup_threads(1)
        t0 = time.time()
        pre = pretrain(make_tasks(), vit)
        timings["pretrain"] = round(time.time() - t0, 1)
        log(f"[pretrain] digits 0-4 test accuracy {pre['test_acc']:.3f} ({timings['pretrain']} s)")
        methods = method_table(vit)
    if lr_pilot:
        units += lr_pilot_units(vit, pre, methods)
    else:
        if want("E4"):
            # longest units first, so two workers finish together
            for shots in sorted(vit["shots"], key=lambda s: -1e9 if s is None else -s):
                for task in vit["tasks"]:
                    units.append(("E4", (task, shots, pre["state"], vit, methods)))
        if want("E6"):
            for shots in vit["e6_shots"]:
                units.append(("E6v", (vit["e6_task"], shots, pre["state"], vit)))
            units.append(("E6m", ({**conf["e6m"], "seeds": conf["seeds"]},)))
        if want("E1"):
            units.append(("E1", ({**conf["e1"], "seeds": conf["seeds"]},)))
        if want("E2"):
            units.append(("E2", ({**conf["e2"], "seeds": conf["seeds"]},)))
    results: dict = {"E1": [], "E2": [], "E6m": [], "E4": [], "E6v": [], "analyses": [], "LR": []}
    if workers <= 1:
        setup_threads(1)
        outs = (_unit(k, a) for k, a in units)
        for kind, out in outs:
            _collect(results, kind, out, timings, log)
    else:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as ex:
            futs = [ex.submit(_unit, k, a) for k, a in units]
            for f in futs:
                kind, out = f.result()
                _collect(results, kind, out, timings, log)
    timings["total_wall_s"] = round(time.time() - t_start, 1)
    # raw results
    if lr_pilot:
        save_csv(os.path.join(res_dir, "lr_pilot.csv"), results["LR"])
        return {"lr_pilot": results["LR"], "timings": timings}
    save_csv(os.path.join(res_dir, "e1_matrix_fit.csv"), results["E1"])
    save_csv(os.path.join(res_dir, "e2_rank_ablation.csv"), results["E2"])
    save_csv(os.path.join(res_dir, "e6_matrix_bases.csv"), results["E6m"])
    save_csv(os.path.join(res_dir, "e4_vit.csv"), results["E4"])
    save_csv(os.path.join(res_dir, "e6_vit_bases.csv"), results["E6v"])
    save_json(os.path.join(res_dir, "e4_analyses.json"), results["analyses"])
    return {"results": results, "timings": timings, "pretrain_acc": None if pre is None else pre["test_acc"],
            "methods": methods, "workers": workers}


def _collect(results, kind, out, timings, log):
    if kind == "E4":
        results["E4"].extend(out["rows"])
        for a in out["analyses"]:
            results["analyses"].append({"task": out["task"], **a})
        key = f"E4 {out['task']} shots={out['shots']}"
    elif kind == "E6v":
        results["E6v"].extend(out["rows"])
        key = f"E6-vit shots={out['rows'][0]['shots'] if out['rows'] else '?'}"
    elif kind == "LR":
        results["LR"].extend(out["rows"])
        key = f"LR pilot {out['task']} shots={out['shots']}"
    else:
        results[kind].extend(out["rows"])
        key = kind
    timings[key] = out["seconds"]
    log(f"[{key}] done in {out['seconds']} s")


LR_GRID = {"full": [3e-4, 1e-3, 3e-3], "vera": [3e-3, 1e-2, 3e-2], "lora": [3e-3, 1e-2, 3e-2],
           "randlora": [1e-3, 3e-3, 1e-2, 3e-2]}


def lr_pilot_units(vit: dict, pre: dict, methods: list[dict]) -> list:
    """The learning-rate pilot that fixed the E4 learning rates (seed 0, perm task, validation split)."""
    cfg = {**copy.deepcopy(vit), "seeds": 1, "analyses": False}
    names = {"FT", f"VeRA-{vit['vera_r']}", "LoRA-4", "LoRA-16"}
    names |= {m["name"] for m in methods if m.get("matched_to") in ("LoRA-4", "LoRA-16")}
    units = []
    for shots in (16, None):
        sel = []
        for m in methods:
            if m["name"] in names:
                sel += [dict(m, lr=lr) for lr in LR_GRID[m["method"]]]
        units.append(("LR", ("perm", shots, pre["state"], cfg, sel)))
    return units
