"""`neon demo`: the whole Neon loop on the two toy models, through the same core path as every
family (synthetic.write → finetune.run → sweep.run).

For each toy model it trains a base on real points, then for a mode-seeking and a
diversity-seeking sampler draws S, fine-tunes a copy for 50 epochs, and sweeps w. As in the paper's
appendix, ζ and τ shape only S; every w is scored with the plain sampler (ζ = 1, τ = 1), with the
same seeds for every w. Writes `results.json`, `curves.png` and, per setting, the synthetic set, the
run and the sweep under `<out>/<model>-<sampler>/`; the bases are `<out>/diffusion-base.pt` and
`<out>/ar-base.pt`.
"""

import contextlib
import json
import logging
import os

import torch

from neon import checkpoint, config, finetune, log, sweep, synthetic
from neon.errors import NeonError
from neon.toy.family import ToySampler, family
from neon.toy.train import STEPS, train_base

logger = logging.getLogger(__name__)

SETTINGS = [
    {"model": "diffusion", "sampler": {"zeta": 1.1}, "mode": "mode-seeking"},
    {"model": "diffusion", "sampler": {"zeta": 0.9}, "mode": "diversity-seeking"},
    {"model": "ar", "sampler": {"tau": 0.5}, "mode": "mode-seeking"},
    {"model": "ar", "sampler": {"tau": 1.6}, "mode": "diversity-seeking"},
]
NEUTRAL = {"diffusion": {"zeta": 1.0}, "ar": {"tau": 1.0}}
W_GRID = {"diffusion": "-2:2:0.25", "ar": "-1:1:0.125"}
FT_LR = {"diffusion": 1e-5, "ar": 1e-4}
NUM_SYNTHETIC = 1000
EPOCHS = 50
# Full run vs --quick: the diffusion base's training (None: the appendix's 10k steps at lr 1e-4;
# quick: 2k steps at lr 1e-3, which lands on a similarly underdispersed base) and samples per
# evaluation.
BUDGET = {False: {"base_steps": None, "base_lr": None, "eval_num": 50_000},
          True: {"base_steps": 2000, "base_lr": 1e-3, "eval_num": 20_000}}


def run(out: str, quick: bool = False) -> list[dict]:
    """Run every setting (resuming what `out` already holds); returns the rows of results.json."""
    budget = BUDGET[quick]
    _claim(out, quick)
    rows = []
    with _one_thread():
        for kind in ("diffusion", "ar"):
            base_path = os.path.join(out, f"{kind}-base.pt")
            if not os.path.exists(base_path):
                steps, lr = (budget["base_steps"], budget["base_lr"]) if kind == "diffusion" else (None, None)
                with log.progress(total=steps or STEPS[kind], unit="step", desc=f"{kind} base") as bar:
                    for item in train_base(kind, steps, lr):
                        if isinstance(item, tuple):
                            bar.update(100)
                family.save(item.net.state_dict(), base_path, like=item)
            base_sha = checkpoint.sha256(base_path)
            for setting in (s for s in SETTINGS if s["model"] == kind):
                rows.append(_setting(out, base_path, base_sha, setting, budget["eval_num"]))
    checkpoint.write_json(os.path.join(out, "results.json"), rows)
    _plot(rows, os.path.join(out, "curves.png"))
    return rows


def _setting(out, base_path, base_sha, setting, eval_num) -> dict:
    kind = setting["model"]
    name, value = next(iter(setting["sampler"].items()))
    folder = os.path.join(out, f"{kind}-{name}{value}")
    sampler = ToySampler(**setting["sampler"])
    model = family.load(base_path)
    syn = synthetic.SyntheticConfig(out=os.path.join(folder, "synthetic"), num=NUM_SYNTHETIC,
                                    batch_size=NUM_SYNTHETIC, shard_size=NUM_SYNTHETIC, labels="none")
    for _ in synthetic.write(family, model, sampler, syn, family.name, base_sha):
        pass
    ft = finetune.FinetuneConfig(data=syn.out, out=os.path.join(folder, "run"), total_images=EPOCHS * NUM_SYNTHETIC,
                                 batch_size=NUM_SYNTHETIC, lr=FT_LR[kind])
    for _ in finetune.run(family, family.load(base_path), ft, family.name):
        pass
    snapshot = os.path.join(ft.out, finetune.snapshot_name(ft.total_images))
    sw = sweep.SweepConfig(self_trained=snapshot, w=W_GRID[kind], num=eval_num, batch_size=eval_num,
                           out=os.path.join(folder, "sweep"), sampler=NEUTRAL[kind])
    for record in sweep.run(family, model, base_path, sampler, sw):
        logger.info("%s %s w=%+.3f fid=%.5f", kind, setting["sampler"], record["w"], record["fid"])
    ws, fids = sweep.curve(sweep.load_results(sw.out), sw, snapshot)
    best = min(range(len(ws)), key=fids.__getitem__)
    return {"model": kind, "sampler": setting["sampler"], "mode": setting["mode"], "base": fids[ws.index(0.0)],
            "best_w": ws[best], "best": fids[best], "w": ws, "metric": fids}


def table(rows: list[dict]) -> str:
    """The demo's table: one line per setting."""
    lines = [f"{'model':<10} {'sampler':<10} {'mode':<18} {'base':>8} {'best w':>7} {'best':>8} {'ratio':>6}"]
    for r in rows:
        sampler = " ".join(f"{k}={v}" for k, v in r["sampler"].items())
        lines.append(f"{r['model']:<10} {sampler:<10} {r['mode']:<18} {r['base']:>8.4f} {r['best_w']:>+7.3f} "
                     f"{r['best']:>8.4f} {r['best'] / r['base']:>6.2f}")
    return "\n".join(lines)


def _claim(out: str, quick: bool) -> None:
    """Refuse to mix a quick and a full run in one directory (their bases differ)."""
    path = os.path.join(out, "demo.json")
    settings = {"quick": quick, "num_synthetic": NUM_SYNTHETIC, "epochs": EPOCHS}
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != settings:
                raise NeonError(f"{out} holds a demo run with other settings; choose another --out or remove it")
    else:
        os.makedirs(out, exist_ok=True)
        checkpoint.write_json(path, settings)


@contextlib.contextmanager
def _one_thread():
    # The toy networks are so small that a second intra-op thread costs more than it gives (2.1 vs
    # 2.7 ms per training step measured on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("diffusion", "ar")):
        for r in (r for r in rows if r["model"] == kind):
            label = ", ".join(f"{k}={v}" for k, v in r["sampler"].items()) + f" ({r['mode']})"
            ax.plot(r["w"], r["metric"], marker="o", markersize=3, label=label)
        ax.axvline(0.0, color="k", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set(title=f"toy {kind}: FID vs w", xlabel="w", ylabel="Fréchet distance to N(0, Σ)")
        ax.legend()
    fig.tight_layout()
    with checkpoint.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
