"""`neon demo`: the whole Neon loop on the two toy models, through the same core path as every
family (synthetic.write → finetune.run → sweep.run; `neon.toy.appendix.run_setting`).

For each toy model it trains a base on real points, then for a mode-seeking and a
diversity-seeking sampler draws S, fine-tunes a copy for 50 epochs, and sweeps w. As in the paper's
appendix, ζ and τ shape only S; every w is scored with the plain sampler (ζ = 1, τ = 1), with the
same seeds for every w. Writes `results.json`, `curves.png` and, per setting, the synthetic set, the
run and the sweep under `<out>/<model>-<sampler>/`; the bases are `<out>/diffusion-base.pt` and
`<out>/ar-base.pt`.
"""

import os

from neon.io import files
from neon.toy import appendix

SETTINGS = appendix.SETTINGS
EPOCHS = 50
W_GRID = {"diffusion": "-2:2:0.25", "ar": "-1:1:0.125"}
EVAL_NUM = {False: 50_000, True: 20_000}


def run(out: str, quick: bool = False) -> list[dict]:
    """Run every setting (resuming what `out` already holds); returns the rows of results.json."""
    with appendix.one_thread():
        rows = [appendix.run_setting(out, s, (EPOCHS,), W_GRID[s["model"]], EVAL_NUM[quick], quick)[0]
                for s in SETTINGS]
    for row in rows:
        del row["epochs"]
    files.write_json(os.path.join(out, "results.json"), rows)
    try:
        appendix.plot_curves([{**r, "epochs": EPOCHS} for r in rows], os.path.join(out, "curves.png"))
    except ImportError:
        pass  # matplotlib is a test extra; the table and results.json do not need it
    return rows


def table(rows: list[dict]) -> str:
    """The demo's table: one line per setting."""
    lines = [f"{'model':<10} {'sampler':<10} {'mode':<18} {'base':>8} {'best w':>7} {'best':>8} {'ratio':>6}"]
    for r in rows:
        sampler = " ".join(f"{k}={v}" for k, v in r["sampler"].items())
        lines.append(f"{r['model']:<10} {sampler:<10} {r['mode']:<18} {r['base']:>8.4f} {r['best_w']:>+7.3f} "
                     f"{r['best']:>8.4f} {r['best'] / r['base']:>6.2f}")
    return "\n".join(lines)
