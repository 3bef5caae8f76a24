"""What the Neon paper predicts, tested on the digits (issue 27, deliverable 4): Neon's gain over the
base against the strength of the sampler's mode-seeking (Heun steps), against |S| and against the
fine-tune length, with the diagnose's cos_P and the precision/recall trade at each.

It reuses a finished `neon demo digits` directory (its classifier, `base.pt` and generator images)
and changes one setting of the recipe at a time (`AXES`; the recipe's own value is the shared
middle point). Each variant draws its S, runs the diagnose, fine-tunes θ_s and runs `neon.sweep.run`
(brent with successive halving, then base and Neon on k paired report ranges); variants with the
same sampler share one results.jsonl, so the base is scored once per sampler. Everything resumes.

    python -m edm.digits.benchmark DEMO_DIR OUT   # one JSON log line per variant, then the table
"""

import argparse
import dataclasses
import json
import logging
import os

from edm.digits import data, demo
from edm.digits.family import DigitsFamily
from neon import config, progress, sweep
from neon.errors import NeonError
from neon.threads import one_thread

logger = logging.getLogger(__name__)

AXES = {
    "steps": ("sampler.num_steps", [4, 8, 18]),
    "S": ("synthetic.num", [300, 1000, 4000]),
    "images": ("self_train.total_images", [1200, 2400, 4800]),
}
SELECTION = {"num": 500, "screen_num": 250}  # cheaper than the demo's: seven variants share the budget
REPORT = {"final_num": 200, "final_seeds": 5}


def run(demo_out: str, out: str) -> list[dict]:
    """One row per variant (axis, value): the chosen w, the base's and Neon's mean FID, the paired
    differences Neon − base of FID, precision and recall with their 95% intervals, and cos_P."""
    s = demo.settings()
    split = data.split_of(s["data"])
    rows, done = [], {}
    with one_thread():
        net, _ = demo._classifier(demo_out, split, s["classifier"])
        fam = DigitsFamily(net, split)
        base_path = os.path.join(demo_out, "base.pt")
        base = fam.load(base_path)
        extra = demo._extra(fam, fam.features(split["reference"][0]))
        for axis, (key, values) in AXES.items():
            for value in values:
                v = demo.settings()
                config.set_dotted(v, key, value, parse=False)
                name = (
                    f"steps{v['sampler']['num_steps']}-S{v['synthetic']['num']}"
                    f"-ft{v['self_train']['total_images']}"
                )
                if name not in done:
                    done[name] = _variant(os.path.join(out, name), fam, base, base_path, split, v, extra)
                row = {"axis": axis, "value": value, "variant": name, **done[name]}
                rows.append(row)
                logger.info("%s", json.dumps(row))
    return rows


def _variant(d: str, fam, base, base_path: str, split: dict, v: dict, extra) -> dict:
    sampler = fam.Sampler(**v["sampler"])
    s_dir = demo._synthetic(d, fam, base, base_path, sampler, v["synthetic"])
    diagnosis = demo._diagnose(d, fam, base, split["generator"][:2], s_dir, v["diagnose"])
    self_path = demo._finetune(os.path.join(d, "self-train"), fam, base, s_dir, v["self_train"], "θ_s")
    section = {**v["sweep"], **SELECTION}
    out = os.path.join(os.path.dirname(d), f"sweep-steps{v['sampler']['num_steps']}")
    conf = sweep.SweepConfig(
        self_trained=self_path, out=out, final_seed_base=v["report"]["seed_base"], **REPORT, **section
    )
    found = progress.drain(sweep.run(fam, base, base_path, sampler, conf, extra=extra), os.path.basename(d))
    final = found.final
    metrics = ("fid", "precision", "recall", "label_accuracy")
    paired = {m: dataclasses.asdict(final.paired[m]) for m in metrics}
    return {
        "w": found.w,
        "base_fid": final.base["fid"].mean,
        "neon_fid": final.neon["fid"].mean,
        **paired,
        "verdict": final.verdict,
        "cos_p": [diagnosis["cos_p"], diagnosis["low"], diagnosis["high"]],
        "k": conf.final_seeds,
        "n": conf.final_num,
    }


def table(rows: list[dict]) -> str:
    """One line per variant: Neon − base FID with its interval, precision and recall changes, cos_P."""
    lines = [
        f"{'axis':<7} {'value':>6} {'w':>6} {'base FID':>9} {'Neon − base FID [95%]':>24} "
        f"{'Δprecision':>11} {'Δrecall':>8} {'cos_P [95%]':>24}"
    ]
    for r in rows:
        f, c = r["fid"], r["cos_p"]
        lines.append(
            f"{r['axis']:<7} {r['value']:>6} {r['w']:>+6.2f} {r['base_fid']:>9.2f} "
            f"{f['mean']:>+7.2f} [{f['low']:+6.2f}, {f['high']:+6.2f}] "
            f"{r['precision']['mean']:>+11.3f} {r['recall']['mean']:>+8.3f} "
            f"{c[0]:>+7.3f} [{c[1]:+.3f}, {c[2]:+.3f}]"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo_out", help="a finished `neon demo digits` directory")
    p.add_argument("out", help="where the variants go (resumed when it exists)")
    args = p.parse_args(argv)
    try:
        demo.finished(args.demo_out)  # before the classifier, which `run` would otherwise train there
    except NeonError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(table(run(args.demo_out, args.out)))


if __name__ == "__main__":
    main()
