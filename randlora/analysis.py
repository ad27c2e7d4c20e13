"""Analysis tools for comparing fine-tuned models (pure torch / numpy / matplotlib).

* Representation similarity: ``linear_cka`` (Kornblith et al. 2019), ``layer_activations``
  (forward hooks), ``cka_per_layer`` and ``plot_cka``.
* Loss landscape: ``loss_plane`` evaluates the loss on the plane through three solutions placed at
  (0, 0), (1, 0) and (0.5, 1) (the RandLoRA paper's Fig. 4 / App. A construction), ``loss_path``
  along a straight segment, and ``plot_loss_plane`` draws the contour plot.
  ``merged_state_dict`` / ``state_delta`` turn an adapted model into plain-weight deltas.
* Update spectra: ``spectrum``, ``effective_rank`` (Roy & Vetterli 2007), ``numerical_rank`` and
  ``layer_spectra`` over every adapted layer of a model (or over a dict of weight deltas).
* ``plot_rank_heatmap``: DoRA-DR's surviving rank per layer and matrix type.

Nothing here depends on Hydra or Lightning; matplotlib is imported lazily by the plot functions.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["linear_cka", "layer_activations", "cka_per_layer", "plot_cka",
           "plane_coefficients", "mix_state", "loss_plane", "loss_path", "plot_loss_plane",
           "merged_state_dict", "state_delta",
           "spectrum", "effective_rank", "numerical_rank", "layer_spectra", "plot_spectra", "plot_rank_heatmap"]

PLANE_POINTS = ((0.0, 0.0), (1.0, 0.0), (0.5, 1.0))


def _finish(fig, path):
    """Lay out a figure; if ``path`` is given, save it there and close it. Returns the figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return fig


def _as_f64(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.detach().to("cpu", torch.float64)


# ------------------------------------------------------------------------------------------- CKA
def linear_cka(X, Y) -> float:
    """Linear CKA between two representations of the same samples.

    ``X`` is (p1, n) and ``Y`` is (p2, n): **features x samples** (column k of both is sample k).
    Each feature is centred over the samples, then
    CKA = ||Y X^T||_F^2 / (||X X^T||_F ||Y Y^T||_F), computed in float64 through whichever of the
    feature-space or sample-space (Gram) forms is smaller. The value lies in [0, 1] and is invariant
    to orthogonal transforms and isotropic scaling of either representation (not to general
    invertible linear maps). A representation that is constant over the samples has no
    centred variance; CKA is undefined there and 0.0 is returned.
    """
    x, y = _as_f64(X), _as_f64(Y)
    if x.dim() == 1:
        x = x[None]
    if y.dim() == 1:
        y = y[None]
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"linear_cka expects 2-D (features, samples) arrays, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"X and Y must have the same number of samples (columns): X is {tuple(x.shape)}, "
                         f"Y is {tuple(y.shape)}; pass features x samples")
    if x.shape[1] < 2:
        raise ValueError("linear_cka needs at least 2 samples")
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    p1, p2, n = x.shape[0], y.shape[0], x.shape[1]
    if p1 * p2 <= n * n:
        hsic_xy = (y @ x.t()).square().sum()
        hsic_xx = (x @ x.t()).square().sum()
        hsic_yy = (y @ y.t()).square().sum()
    else:
        kx, ky = x.t() @ x, y.t() @ y          # (n, n) Gram matrices of centred features
        hsic_xy = (kx * ky).sum()
        hsic_xx = kx.square().sum()
        hsic_yy = ky.square().sum()
    denom = torch.sqrt(hsic_xx) * torch.sqrt(hsic_yy)
    if not torch.isfinite(denom) or denom <= 0:
        return 0.0
    val = float(hsic_xy / denom)
    return min(max(val, 0.0), 1.0)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, Mapping):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


@torch.no_grad()
def layer_activations(model: nn.Module, inputs, layer_names: Sequence[str],
                      batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules on ``inputs``, captured with forward hooks.

    Returns ``{name: (N, F) float32 CPU tensor}``: each sample's output is flattened (all tokens
    and channels). For modules returning tuples (e.g. ``nn.MultiheadAttention``) the first tensor
    is used. The model runs in eval mode under ``no_grad``; its training flag is restored.
    """
    names = list(layer_names)
    if not names:
        raise ValueError("layer_names is empty")
    mods = {}
    for name in names:
        try:
            mods[name] = model.get_submodule(name)
        except AttributeError:
            avail = [n for n, _ in model.named_modules() if n][:30]
            raise ValueError(f"model has no submodule {name!r}; some available names: {avail}") from None
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook_for(name):
        def hook(_mod, _inp, out):
            t = _first_tensor(out)
            if t is None:
                raise TypeError(f"layer {name!r} returned no tensor")
            store[name].append(t.detach().reshape(t.shape[0], -1).to("cpu", torch.float32))
        return hook

    handles = [mods[n].register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        if batch_size is None or not isinstance(inputs, torch.Tensor):
            model(inputs)
        else:
            for i in range(0, inputs.shape[0], batch_size):
                model(inputs[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(store[n]) for n in names}


def cka_per_layer(model_a: nn.Module, model_b: nn.Module, inputs, layer_names: Sequence[str],
                  layer_names_b: Sequence[str] | None = None, batch_size: int | None = None) -> dict[str, float]:
    """Linear CKA between the two models' outputs of each named layer on the same ``inputs``.

    ``layer_names_b`` maps the names positionally when model_b names its layers differently.
    Returns ``{name_in_a: cka}`` in layer order.
    """
    names_a = list(layer_names)
    names_b = list(layer_names_b) if layer_names_b is not None else names_a
    if len(names_a) != len(names_b):
        raise ValueError("layer_names and layer_names_b must have the same length")
    acts_a = layer_activations(model_a, inputs, names_a, batch_size)
    acts_b = layer_activations(model_b, inputs, names_b, batch_size)
    return {na: linear_cka(acts_a[na].t(), acts_b[nb].t()) for na, nb in zip(names_a, names_b)}


def plot_cka(curves: Mapping[str, Mapping[str, float] | Sequence[float]], path=None, *, errors=None,
             title: str = "Linear CKA to full fine-tuning", layer_labels: Sequence[str] | None = None):
    """One line per method over the layers. ``curves``: {method: {layer: cka}} or {method: [cka...]}.

    ``errors`` (same structure) draws error bars. Saves a PNG when ``path`` is given; returns the figure.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, vals in curves.items():
        labels = list(vals.keys()) if isinstance(vals, Mapping) else None
        ys = list(vals.values()) if isinstance(vals, Mapping) else list(vals)
        xs = np.arange(len(ys))
        err = None
        if errors is not None and method in errors:
            e = errors[method]
            err = list(e.values()) if isinstance(e, Mapping) else list(e)
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
        if layer_labels is None and labels is not None:
            layer_labels = labels
    if layer_labels is not None:
        ax.set_xticks(range(len(layer_labels)))
        ax.set_xticklabels(layer_labels, rotation=30, ha="right")
    ax.set_ylabel("linear CKA")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


# ----------------------------------------------------------------------------------- loss plane
def plane_coefficients(x: float, y: float) -> tuple[float, float, float]:
    """Barycentric coordinates of (x, y) w.r.t. the triangle (0, 0), (1, 0), (0.5, 1).

    Returns (a1, a2, a3) with a1 + a2 + a3 = 1 and a1 P1 + a2 P2 + a3 P3 = (x, y); outside the
    triangle some coefficients are negative (extrapolation).
    """
    a3 = y
    a2 = x - 0.5 * y
    a1 = 1.0 - x - 0.5 * y
    return a1, a2, a3


def mix_state(base_state: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]],
              coeffs: Sequence[float]) -> dict[str, torch.Tensor]:
    """base + sum_i c_i delta_i, key by key (a key missing from a delta counts as zero there).

    Terms are added in order, so with coefficients (1, 0, 0) the result is exactly base + delta_1.
    """
    out = {}
    for k, w in base_state.items():
        if not torch.is_floating_point(w):
            out[k] = w
            continue
        acc = w.clone()
        for c, d in zip(coeffs, deltas):
            if k in d and c != 0.0:
                acc = acc + c * d[k].to(acc.dtype)
        out[k] = acc
    return out


def _check_deltas(base_state, deltas):
    if not isinstance(deltas, Mapping) or len(deltas) != 3:
        raise ValueError("deltas must be a dict of exactly 3 state-dict deltas, e.g. "
                         "{'LoRA': dW_lora, 'RandLoRA': dW_randlora, 'FT': dW_ft}; "
                         f"got {type(deltas).__name__} with {len(deltas) if hasattr(deltas, '__len__') else '?'} entries")
    for name, d in deltas.items():
        extra = sorted(set(d) - set(base_state))
        if extra:
            raise ValueError(f"delta {name!r} has keys missing from base_state: {extra[:5]}")
        bad = [k for k in d if tuple(d[k].shape) != tuple(base_state[k].shape)]
        if bad:
            raise ValueError(f"delta {name!r} has shapes differing from base_state for {bad[:5]}")


def _grid_axes(grid):
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError("an integer grid must be >= 2 points per axis")
        xs, ys = np.linspace(-0.5, 1.5, grid), np.linspace(-0.5, 1.5, grid)
    else:
        try:
            xs, ys = grid
        except (TypeError, ValueError):
            raise ValueError("grid must be an int (points per axis over [-0.5, 1.5]^2) or a pair (xs, ys)") from None
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if xs.ndim != 1 or ys.ndim != 1 or len(xs) == 0 or len(ys) == 0:
            raise ValueError("grid (xs, ys) must be two non-empty 1-D sequences")
    return xs, ys


def loss_plane(base_state: Mapping[str, torch.Tensor], deltas: Mapping[str, Mapping[str, torch.Tensor]],
               loss_fn: Callable[[dict], float], grid=25) -> dict:
    """Loss on the plane through three solutions W0 + dW_1, W0 + dW_2, W0 + dW_3.

    The solutions (the items of ``deltas`` in order) sit at (0, 0), (1, 0) and (0.5, 1). At a grid
    point (x, y) the weights are W0 + sum_i a_i dW_i with (a_1, a_2, a_3) = ``plane_coefficients(x, y)``
    (sum a_i = 1). ``loss_fn(state_dict) -> float`` evaluates a full state dict. ``grid`` is an int
    (points per axis over [-0.5, 1.5]) or a pair (xs, ys). The three solutions are also evaluated
    exactly at their own coordinates (``endpoint_losses``) whether or not the grid hits them.

    Returns {"xs", "ys", "loss" (len(ys) x len(xs) list), "names", "points", "endpoint_losses",
    "min_loss", "argmin_xy"}.
    """
    _check_deltas(base_state, deltas)
    names = list(deltas)
    dl = [deltas[n] for n in names]
    xs, ys = _grid_axes(grid)
    loss = np.empty((len(ys), len(xs)))
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            loss[iy, ix] = float(loss_fn(mix_state(base_state, dl, plane_coefficients(float(x), float(y)))))
    endpoints = {}
    for i, n in enumerate(names):
        c = [0.0, 0.0, 0.0]
        c[i] = 1.0
        endpoints[n] = float(loss_fn(mix_state(base_state, dl, c)))
    iy, ix = np.unravel_index(np.nanargmin(loss), loss.shape)
    return {"xs": xs.tolist(), "ys": ys.tolist(), "loss": loss.tolist(), "names": names,
            "points": {n: list(p) for n, p in zip(names, PLANE_POINTS)},
            "endpoint_losses": endpoints, "min_loss": float(loss[iy, ix]),
            "argmin_xy": [float(xs[ix]), float(ys[iy])]}


def loss_path(base_state, delta_a, delta_b, loss_fn, steps: int = 11) -> dict:
    """Loss along W0 + (1 - t) dW_a + t dW_b for t in [0, 1]; ``barrier`` = max minus the larger end."""
    ts = np.linspace(0.0, 1.0, steps)
    vals = [float(loss_fn(mix_state(base_state, [delta_a, delta_b], [1.0 - t, t]))) for t in ts]
    return {"t": ts.tolist(), "loss": vals, "barrier": max(vals) - max(vals[0], vals[-1])}


def plot_loss_plane(result: dict, path=None, *, clamp: float | None = 1.2, title: str = "Loss plane",
                    log: bool = False):
    """Filled contour plot of a ``loss_plane`` result with the three solutions marked.

    ``clamp`` clips the loss at clamp x (the lowest endpoint loss) as in the paper (20 % above the
    shallowest minimum is 1.2 x), so the basins stay readable; None disables clipping.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = np.asarray(result["xs"]), np.asarray(result["ys"])
    z = np.asarray(result["loss"], dtype=float)
    if clamp is not None:
        lo = max(min(result["endpoint_losses"].values()), 1e-12)
        ceiling = max(clamp * max(result["endpoint_losses"].values()), lo * 1.01)
        z = np.minimum(z, ceiling)
    if log:
        z = np.log10(np.maximum(z, 1e-12))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cs = ax.contourf(xs, ys, z, levels=30, cmap="viridis")
    ax.contour(xs, ys, z, levels=10, colors="k", linewidths=0.4, alpha=0.5)
    fig.colorbar(cs, ax=ax, label="log10 loss" if log else "loss (clipped)" if clamp else "loss")
    for name, (px, py) in result["points"].items():
        ax.plot(px, py, "o", color="white", markeredgecolor="k")
        ax.annotate(f"{name}\n{result['endpoint_losses'][name]:.3g}", (px, py), textcoords="offset points",
                    xytext=(6, 6), color="white", fontsize=8)
    tri = np.array(list(result["points"].values()) + [list(result["points"].values())[0]])
    ax.plot(tri[:, 0], tri[:, 1], "w--", linewidth=0.8)
    ax.set_title(title)
    ax.set_aspect("equal")
    return _finish(fig, path)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain-model state dict of an adapted model with every update folded into its base weight.

    Keys are those of the un-adapted model (``.base_layer`` removed, adapter parameters and random
    bases dropped). The model itself is not modified (a deep copy is merged).
    """
    from randlora.adapters import adapted_layers, merge

    if not adapted_layers(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    m = copy.deepcopy(model)
    merge(m)
    skip = set()
    for name, layer in adapted_layers(m):
        for pname, _ in layer.update.named_parameters():
            skip.add(f"{name}.update.{pname}")
    out = {}
    for k, v in m.state_dict().items():
        if k in skip or ".update." in f".{k}":
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    return out


def state_delta(state: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state - base_state`` for every floating-point key of ``base_state`` (keys must match)."""
    missing = sorted(set(base_state) - set(state))
    if missing:
        raise ValueError(f"state lacks keys of base_state: {missing[:5]}")
    return {k: (state[k] - v) for k, v in base_state.items() if torch.is_floating_point(v)}


# -------------------------------------------------------------------------------------- spectra
def spectrum(dW) -> np.ndarray:
    """Singular values of a 2-D matrix, descending, in float64."""
    m = _as_f64(dW)
    if m.dim() != 2:
        raise ValueError(f"spectrum expects a 2-D matrix, got shape {tuple(m.shape)}")
    return torch.linalg.svdvals(m).numpy()


def effective_rank(dW, *, is_spectrum: bool = False) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / sum_j s_j.

    Equals k for a rank-k matrix with k equal singular values, and lies in [1, min(shape)]
    otherwise; 0.0 for the zero matrix. Pass singular values with ``is_spectrum=True``.
    """
    s = np.asarray(dW, dtype=float) if is_spectrum else spectrum(dW)
    s = np.abs(s)
    total = s.sum()
    if total <= 0 or not np.isfinite(total):
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def numerical_rank(dW, rtol: float | None = None) -> int:
    """Number of singular values above rtol x s_max (rtol defaults to max(shape) x float32 eps)."""
    m = _as_f64(dW)
    s = spectrum(m)
    if s.size == 0 or s[0] == 0:
        return 0
    if rtol is None:
        rtol = max(m.shape) * float(np.finfo(np.float32).eps)
    return int((s > rtol * s[0]).sum())


def layer_spectra(model_or_deltas, rtol: float | None = None) -> dict[str, dict]:
    """Spectrum statistics of each update: an adapted model's ``layer.delta_weight()``, or a
    dict ``{name: dW}`` of 2-D deltas (other entries are skipped).

    Returns {name: {"singular_values", "effective_rank", "rank", "fro_norm", "shape"}}.
    """
    if isinstance(model_or_deltas, nn.Module):
        from randlora.adapters import adapted_layers

        layers = adapted_layers(model_or_deltas)
        if not layers:
            raise ValueError("the model has no adapted layers; pass a dict {name: dW} for full fine-tuning")
        with torch.no_grad():
            mats = {n: layer.delta_weight() for n, layer in layers}
    else:
        mats = {k: v for k, v in model_or_deltas.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
    out = {}
    for name, m in mats.items():
        s = spectrum(m)
        out[name] = {"singular_values": s.tolist(), "effective_rank": effective_rank(s, is_spectrum=True),
                     "rank": numerical_rank(m, rtol), "fro_norm": float(np.sqrt((s ** 2).sum())),
                     "shape": list(m.shape)}
    return out


def plot_spectra(spectra: Mapping[str, Sequence[float]], path=None, *, title: str = "Singular values of dW",
                 normalise: bool = True):
    """Singular-value curves, one per entry ({label: singular values}), on a log y-axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, s in spectra.items():
        s = np.asarray(s, dtype=float)
        if normalise and s.size and s[0] > 0:
            s = s / s[0]
        ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), label=label)
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1" if normalise else "sigma_i")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_rank_heatmap(rank_table: Sequence[tuple[str, int]], path=None, *, r_start: int | None = None,
                      r: int | None = None):
    """Per-layer surviving rank as an image (layer index x matrix type), from
    ``DynamicRankScheduler.rank_table()``: [(layer name, rank), ...]. Returns the figure."""
    import re

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols, vals = {}, {}, {}
    for name, rank in rank_table:
        m = re.search(r"(\d+)", name)
        layer = int(m.group(1)) if m else 0
        kind = re.sub(r".*?\d+\.", "", name) if m else name
        rows.setdefault(layer, len(rows))
        cols.setdefault(kind, len(cols))
        vals[(layer, kind)] = rank
    grid = np.full((len(rows), len(cols)), np.nan)
    for (layer, kind), v in vals.items():
        grid[rows[layer], cols[kind]] = v
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(cols), 1 + 0.35 * len(rows)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), list(cols), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(k) for k in rows])
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    ax.set_title("DoRA-DR surviving rank" + (f" (start {r_start}, target mean {r})" if r_start else ""))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _finish(fig, path)
