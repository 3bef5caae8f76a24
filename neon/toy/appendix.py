"""The experiments of the Neon paper's toy appendix, as functions the notebook and `neon demo` call.

* `run_curves`: for each toy model and sampler (ζ ∈ {0.9, 1.1}, τ ∈ {0.5, 1.6}), draw S, fine-tune
  for 250 epochs with snapshots after 50 and 250, and score every w on a fine grid (w ∈ [−2, 2] for
  diffusion, [−1, 1] for AR) with the plain sampler and the same seeds for every w.
* `run_cosines`: the preconditioned cosine cos_P between the real and the synthetic gradient
  (`neon.diagnose`) as ζ runs over [0.8, 1.2] and τ over [0.6, 1.4].

Everything goes through the core (`synthetic.write`, `finetune.run`, `sweep.run`), and reruns
resume from what `out` already holds. Mirrors the experiments of
`SinaAlemohammad/Neon:toy_appendix.ipynb`. `method` picks the diffusion sampler: 'notebook' (the
default) is that notebook's own deterministic sampler, which made the paper's figures; 'ddim' is a
correct DDIM (see `neon.toy.models.EpsMLP.sample_notebook` for how the two differ). The AR sampler
is the same under both.
"""

import json
import os

import numpy as np
import torch

from neon import diagnose, finetune, log, progress, sweep, synthetic
from neon.errors import NeonError
from neon.family import write_checkpoint
from neon.io import files
from neon.threads import one_thread  # tests and benchmarks reach it as appendix.one_thread
from neon.toy import models
from neon.toy.family import METHODS, ToySampler, family
from neon.toy.train import STEPS, train_base

SETTINGS = [
    {"model": "diffusion", "sampler": {"zeta": 1.1}, "mode": "mode-seeking"},
    {"model": "diffusion", "sampler": {"zeta": 0.9}, "mode": "diversity-seeking"},
    {"model": "ar", "sampler": {"tau": 0.5}, "mode": "mode-seeking"},
    {"model": "ar", "sampler": {"tau": 1.6}, "mode": "diversity-seeking"},
]
NEUTRAL = {"diffusion": {"zeta": 1.0}, "ar": {"tau": 1.0}}
FT_LR = {"diffusion": 1e-5, "ar": 1e-4}
NUM_SYNTHETIC = 1000
# Quick runs: a shorter diffusion base (2k steps at lr 1e-3 lands on a similarly underdispersed
# base), fewer samples per point and coarser grids.
BASE = {False: (None, None), True: (2000, 1e-3)}
EVAL_NUM = {False: 50_000, True: 10_000}
W_GRID = {
    False: {"diffusion": "-2:2:0.05", "ar": "-1:1:0.025"},
    True: {"diffusion": "-2:2:0.2", "ar": "-1:1:0.05"},
}
COSINE = {
    False: {"points": 10_000, "values": 21, "repeats": 8},
    True: {"points": 2000, "values": 9, "repeats": 16},
}
COSINE_RANGE = {"diffusion": ("zeta", 0.8, 1.2), "ar": ("tau", 0.6, 1.4)}


def base(out: str, kind: str, quick: bool = False) -> str:
    """Path of the toy base of `kind` in `out`, trained first if it is not there (the base does not
    depend on the sampler)."""
    path = os.path.join(out, f"{kind}-base.pt")
    _claim(out, quick)
    if not os.path.exists(path):
        steps, lr = BASE[quick] if kind == "diffusion" else (None, None)
        with log.progress(total=steps or STEPS[kind], unit="step", desc=f"{kind} base") as bar:
            for item in train_base(kind, steps, lr):
                if isinstance(item, tuple):
                    bar.update(100)
        write_checkpoint(family, item.net.state_dict(), path, like=item)
    return path


def run_setting(out: str, setting: dict, epochs: tuple[int, ...], w_grid: str, eval_num: int,
                quick: bool = False, method: str = "ddim") -> list[dict]:
    """Neon for one toy model and sampler: S, a fine-tune with a snapshot after each of `epochs`,
    and a sweep of `w_grid` per snapshot. One row per snapshot: model, sampler, mode, epochs, base,
    best_w, best, and the curve as w and metric. `method` is the diffusion sampler's (METHODS)."""
    kind = setting["model"]
    base_path = base(out, kind, quick)
    name, value = next(iter(setting["sampler"].items()))
    sampler = _sampler(kind, method, **setting["sampler"])
    suffix = "-notebook" if kind == "diffusion" and method == "notebook" else ""
    folder = os.path.join(out, f"{kind}-{name}{value}{suffix}")
    model = family.load(base_path)
    syn = synthetic.SyntheticConfig(out=os.path.join(folder, "synthetic"), num=NUM_SYNTHETIC,
                                    batch_size=NUM_SYNTHETIC, shard_size=NUM_SYNTHETIC, labels="none")
    progress.last(synthetic.write(family, model, sampler, syn, files.sha256(base_path)))
    step = int(np.gcd.reduce(epochs)) * NUM_SYNTHETIC
    ft = finetune.FinetuneConfig(
        data=syn.out,
        out=os.path.join(folder, "run"),
        total_images=max(epochs) * NUM_SYNTHETIC,
        batch_size=NUM_SYNTHETIC,
        lr=FT_LR[kind],
        snapshot_every_images=step,
    )
    progress.last(finetune.run(family, family.load(base_path), ft))
    rows = []
    for epoch in epochs:
        snapshot = os.path.join(ft.out, finetune.snapshot_name(epoch * NUM_SYNTHETIC))
        sw = sweep.SweepConfig(self_trained=snapshot, w=w_grid, num=eval_num, batch_size=eval_num,
                               out=os.path.join(folder, "sweep"), sampler=NEUTRAL[kind])
        progress.last(sweep.run(family, model, base_path, sampler, sw))
        ws, fids = sweep.curve(sweep.load_results(sw.out), sw, snapshot)
        best = min(range(len(ws)), key=fids.__getitem__)
        rows.append(
            {
                "model": kind,
                "sampler": setting["sampler"],
                "method": sampler.method if kind == "diffusion" else None,
                "mode": setting["mode"],
                "epochs": epoch,
                "base": fids[ws.index(0.0)],
                "best_w": ws[best],
                "best": fids[best],
                "w": ws,
                "metric": fids,
            }
        )
    return rows


def run_curves(out: str = "outputs/appendix", quick: bool = False, method: str = "notebook") -> list[dict]:
    """The appendix's FID-vs-w curves after 50 and 250 fine-tune epochs, for every setting."""
    with one_thread():
        rows = [
            row
            for setting in SETTINGS
            for row in run_setting(
                out, setting, (50, 250), W_GRID[quick][setting["model"]], EVAL_NUM[quick], quick, method
            )
        ]
    files.write_json(os.path.join(out, "curves.json"), rows)
    return rows


def run_cosines(out: str = "outputs/appendix", quick: bool = False, method: str = "notebook") -> list[dict]:
    """cos_P (with its bootstrap interval) of real points against synthetic sets drawn with ζ over
    [0.8, 1.2] (diffusion) and τ over [0.6, 1.4] (AR). One row per (model, value)."""
    plan = COSINE[quick]
    conf = diagnose.DiagnoseConfig(repeats=plan["repeats"])
    rows = []
    with one_thread():
        for kind, (name, low, high) in COSINE_RANGE.items():
            model = family.load(base(out, kind, quick))
            real = (models.true_samples(plan["points"], seed=0), torch.full((plan["points"],), -1))
            for value in np.linspace(low, high, plan["values"]).round(4).tolist():
                seeds = torch.arange(plan["points"]) + 10_000_000
                syn = family.sample(model, real[1], seeds, _sampler(kind, method, **{name: value}))
                result = diagnose.run(family, model, real, (syn, real[1]), conf)
                rows.append({"model": kind, "sampler": {name: value}, **result})
    files.write_json(os.path.join(out, "cosines.json"), rows)
    return rows


def plot_curves(rows: list[dict], path: str | None = None):
    """FID against w, one panel per (model, epochs), one line per sampler; saved when `path` is given."""
    plt = _pyplot()
    panels = sorted({(r["model"], r["epochs"]) for r in rows}, key=lambda p: (p[0] != "diffusion", p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (kind, epochs) in zip(axes[0], panels):
        for r in (r for r in rows if (r["model"], r["epochs"]) == (kind, epochs)):
            label = ", ".join(f"{k}={v}" for k, v in r["sampler"].items()) + f" ({r['mode']})"
            ax.plot(r["w"], r["metric"], label=label)
            ax.plot([r["best_w"]], [r["best"]], "k.")
        ax.axvline(0.0, color="k", linestyle=":", linewidth=1)
        methods = {r.get("method") for r in rows if r["model"] == kind} - {None}
        title = f"{kind} ({', '.join(sorted(methods))} sampler)" if methods else kind
        ax.set(yscale="log", title=f"{title}, {epochs} epochs", xlabel="w", ylabel="FID to N(0, Σ)")
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_cosines(rows: list[dict], path: str | None = None):
    """cos_P against ζ (diffusion) and τ (AR) with the bootstrap band; saved when `path` is given."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, kind in zip(axes, ("diffusion", "ar")):
        sub = [r for r in rows if r["model"] == kind]
        name = COSINE_RANGE[kind][0]
        x = [r["sampler"][name] for r in sub]
        ax.plot(x, [r["cos_p"] for r in sub], marker="o", markersize=3)
        ax.fill_between(x, [r["low"] for r in sub], [r["high"] for r in sub], alpha=0.25)
        ax.axhline(0.0, color="k", linestyle="--", linewidth=1)
        ax.axvline(1.0, color="k", linestyle=":", linewidth=1)
        ax.set(title=f"{kind}: gradient alignment", xlabel=name, ylabel="cos_P", ylim=(-1.05, 1.05))
    return _finish(fig, path)


def _sampler(kind: str, method: str, **fields) -> ToySampler:
    if method not in METHODS:
        raise NeonError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    return ToySampler(method=method, **fields) if kind == "diffusion" else ToySampler(**fields)


def _claim(out: str, quick: bool) -> None:
    """Refuse to mix quick and full bases in one directory."""
    path = os.path.join(out, "toy.json")
    settings = {"quick": quick}
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != settings:
                raise NeonError(f"{out} holds a toy run with other settings (quick={not quick}); "
                                f"choose another --out or remove it")
    else:
        os.makedirs(out, exist_ok=True)
        files.write_json(path, settings)


def _pyplot():
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:  # a notebook shows figures inline; elsewhere only files are written
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        with files.atomic(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    return fig
