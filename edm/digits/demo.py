"""`neon demo digits`: Neon on a real image generator trained on CPU, with w chosen by the core's
sweep and a paired report with 95% intervals (issues 17, 27). Settings: `configs/digits/edm.yaml`.

Stages, each skipped when its output is complete (a rerun resumes and computes nothing twice):
1. the split (`data.split`: generator / features / reference / real, disjoint) and the classifier,
   trained on the `features` images only (`classifier.pt`);
2. the base: a class-conditional EDM trained from scratch on the `generator` images by
   `neon.finetune.run` (those images written as a set of the synthetic-set layout, `real/`): `base.pt`;
3. S: drawn from the base with the usual sampler (`synthetic/`);
4. `neon.diagnose.run` on the base (generator images against S): the predicted sign of w;
5. θ_s: the base fine-tuned on S (`self-train/`); the matched-compute controls: the base fine-tuned
   with the same images, batch and lr on the generator images, without an EMA (`control/`) and with
   the base's EMA half-life (`control-ema/`);
6. `neon.sweep.run` (`sweep/results.jsonl`): w by the recipe's search (brent with successive
   halving) on the selection seeds, then the base and Neon on k report ranges of n seeds, paired by
   range; the sweep's final report is the comparison of Neon with the base;
7. the controls on the same report ranges through `neon.evaluate.evaluate`, one line each in
   `sweep/controls.jsonl` (keyed like the sweep's records); the `real` row: n real images no network
   trained on, scored with the same features, reference and metrics;
8. `results.json`, `fid_vs_w.png` and `samples.png`.

Every score is `neon.evaluate.evaluate`'s, with the family's features (the classifier's penultimate
layer, whitened by the reference images' covariance: `DigitsFamily.features`) against the reference
images' statistics; label accuracy and precision/recall (against the reference images' features) are
`evaluate.Metrics.extra`. Summaries and paired differences are
`neon.evaluate.summarize`, `paired` and `verdict`, as in the sweep's final report.
"""

import copy
import dataclasses
import json
import logging
import os
import time

import torch

from edm.digits import classifier, data
from edm.digits.family import DigitsFamily
from neon import config, diagnose, evaluate, finetune, plots, progress, summary, sweep, synthetic
from neon import family as neon_family
from neon.errors import NeonError
from neon.io import checkpoint, files
from neon.metrics import fid
from neon.progress import Progress
from neon.threads import one_thread

logger = logging.getLogger(__name__)

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "digits", "edm.yaml")
SETTINGS = config.load_yaml(RECIPE)
CONTROLS = "controls.jsonl"
MODELS = ("base", "neon", "control", "control_ema")
METRICS = ("fid", "label_accuracy", "precision", "recall")


def settings(quick: bool = False) -> dict:
    """SETTINGS without its `quick` section, whose dotted fields replace the others when `quick`."""
    resolved = copy.deepcopy(SETTINGS)
    shorter = resolved.pop("quick")
    if quick:
        for key, value in shorter.items():
            config.set_dotted(resolved, key, value, parse=False)
    return resolved


def run(out: str, quick: bool = False, overrides: dict | None = None) -> dict:
    """Run every stage into `out` (resuming what it holds) and return what results.json holds.
    `overrides` (dotted key -> value) replace settings after `quick` (the tests' smaller run). Runs
    on one intra-op thread: these networks are small, and on a busy 2-core machine a second thread
    costs more than it gives (the classifier trained in 149 s of wall time with two threads next to
    other work, 18 s with one)."""
    s = settings(quick)
    for key, value in (overrides or {}).items():
        config.set_dotted(s, key, value, parse=False)
    with one_thread():
        return _run(out, s)


def _run(out: str, s: dict) -> dict:
    start = time.time()
    os.makedirs(out, exist_ok=True)
    split = data.split_of(s["data"])
    net, accuracy = _classifier(out, split, s["classifier"])
    fam = DigitsFamily(net, split)
    generator = split["generator"][:2]
    real_set = data.write_set(os.path.join(out, "real"), *generator, fam.name)
    base_path = _base(out, fam, real_set, s["base"])
    base = fam.load(base_path)
    sampler = fam.Sampler(**s["sampler"])
    s_dir = _synthetic(out, fam, base, base_path, sampler, s["synthetic"])
    diagnosis = _diagnose(out, fam, base, generator, s_dir, s["diagnose"])
    self_path = _finetune(os.path.join(out, "self-train"), fam, base, s_dir, s["self_train"], "θ_s on S")
    controls = {
        "control": _finetune(
            os.path.join(out, "control"), fam, base, real_set, s["self_train"], "control on real"
        ),
        "control_ema": _finetune(
            os.path.join(out, "control-ema"),
            fam,
            base,
            real_set,
            {**s["self_train"], **s["control_ema"]},
            "control on real, EMA",
        ),
    }

    conf = _sweep_config(out, self_path, s)
    _check_disjoint(
        [
            (s["synthetic"]["seed_base"], s["synthetic"]["num"]),
            (conf.seed_base, conf.num),
            *conf.final_ranges(),
            (s["samples"]["seed_base"], s["samples"]["num"]),
        ]
    )
    reference = fam.features(split["reference"][0])
    extra = _extra(fam, reference)
    found = progress.drain(sweep.run(fam, base, base_path, sampler, conf, extra=extra), "sweep")
    final = found.final
    rows = progress.drain(_controls(fam, base, base_path, sampler, conf, controls, extra), "controls")

    report = {
        "seeds": final.seeds,
        "num": conf.final_num,
        "base": {"w": 0.0, **_stats(final.base)},
        "neon": {"w": found.w, **_stats(final.neon)},
    }
    paired = {m: _asdict(final.paired.get(m)) for m in METRICS}
    comparisons = {"neon_vs_base": {**paired, "verdict": final.verdict}}
    for name, scored in rows.items():
        values = {m: [r[m] for r in scored] for m in METRICS}
        report[name] = {"w": None, **{m: _asdict(evaluate.summarize(values[m])) for m in METRICS}}
        pairs = {m: evaluate.paired(final.neon[m].values, values[m]) for m in METRICS}
        comparisons[f"neon_vs_{name}"] = {
            **{m: _asdict(p) for m, p in pairs.items()},
            "verdict": evaluate.verdict(pairs["fid"]),
        }
    records = sweep.load_results(conf.out)
    result = {
        "settings": s,
        "split": {role: split[role][2].tolist() for role in data.ROLES},
        "classifier": {
            "heldout_accuracy": accuracy,
            "features": classifier.FEATURES,
            "whitened_dims": fam.whitening()[1].shape[1],
        },
        "diagnose": diagnosis,
        "selection": _selection(records, conf, found),
        "best_w": found.w,
        "report": report,
        "real": _real(fam, split["real"], conf.final_num, reference),
        "comparisons": comparisons,
    }
    result["diagnose"]["agrees_with_best_w"] = _agrees(diagnosis["advice"], found.w)
    result["files"] = _pictures(out, fam, base, base_path, self_path, controls, sampler, result, s["samples"])
    result["seconds"] = round(time.time() - start, 1)
    files.write_json(os.path.join(out, "results.json"), result)
    return result


def finished(out: str) -> dict:
    """What `results.json` holds in `out`, a finished run of this demo; NeonError when there is none.
    The tools that reuse a demo's models check it before they write anything."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise NeonError(f"{path} not found: give the directory of a finished `neon demo digits` run")
    with open(path) as f:
        return json.load(f)


def table(result: dict) -> str:
    """The printed table: each model's mean ± sd over the report ranges, the real row, the paired
    differences with their 95% intervals."""
    report = result["report"]
    k, n = len(report["seeds"]), report["num"]
    lines = [
        f"{'model':<12} {'w':>6}  {f'digits FID (k={k}, n={n})':>24}  {'label accuracy':>16}  "
        f"{'precision':>15}  {'recall':>15}"
    ]
    for name in MODELS:
        row, w = report[name], report[name]["w"]
        cells = [_pm(row[key], digits) for key, digits in zip(METRICS, (2, 3, 3, 3))]
        lines.append(
            f"{name:<12} {'-' if w is None else f'{w:+.2f}':>6}  {cells[0]:>24}  {cells[1]:>16}  "
            f"{cells[2]:>15}  {cells[3]:>15}"
        )
    real = result["real"]
    lines.append(
        f"{'real':<12} {'-':>6}  {real['fid']:>24.2f}  {real['label_accuracy']:>16.3f}  "
        f"{real['precision']:>15.3f}  {real['recall']:>15.3f}"
    )
    for other in MODELS[0:1] + MODELS[2:]:
        c = result["comparisons"][f"neon_vs_{other}"]
        f, a = c["fid"], c["label_accuracy"]
        lines.append(
            f"Neon − {other}, paired over {k} ranges: FID {f['mean']:+.2f} [{f['low']:+.2f}, "
            f"{f['high']:+.2f}] ({f['improved']}/{k} improved), label accuracy {a['mean']:+.3f} "
            f"[{a['low']:+.3f}, {a['high']:+.3f}]: {c['verdict']}"
        )
    d = result["diagnose"]
    lines.append(
        f"classifier accuracy on unseen digits {result['classifier']['heldout_accuracy']:.3f}; "
        f"diagnose cos_P {d['cos_p']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['advice']}); "
        f"best w {result['best_w']:+.2f}"
    )
    return "\n".join(lines)


# --- stages ------------------------------------------------------------------------------------


def _classifier(out: str, split: dict, section: dict) -> tuple[classifier.Classifier, float]:
    """The feature network, trained once on the `features` images (`classifier.pt`), and its accuracy
    on every image it did not train on."""
    path = os.path.join(out, "classifier.pt")
    conf = config.build(classifier.ClassifierConfig, section, "classifier")
    size = split["features"][0].shape[-1]
    if os.path.exists(path):
        net = classifier.build(size)
        net.load_state_dict(checkpoint.read(path).weights)
        net.eval().requires_grad_(False)
    else:
        net = classifier.train(*split["features"][:2], conf)
        checkpoint.write({"state_dict": net.state_dict(), "config": config.to_dict(conf)}, path)
    unseen = [split[role] for role in data.ROLES if role != "features"]
    accuracy = classifier.accuracy(net, torch.cat([r[0] for r in unseen]), torch.cat([r[1] for r in unseen]))
    logger.info("classifier: accuracy on unseen digits %.4f", accuracy)
    return net, accuracy


def _base(out: str, fam: DigitsFamily, real: str, section: dict) -> str:
    """`base.pt`: the EDM trained from scratch on the generator images (its last snapshot: the EMA)."""
    path = os.path.join(out, "base.pt")
    if not os.path.exists(path):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section["seed"])
            model = fam.init(section["arch"])
        run_dir = os.path.join(out, "base-run")
        _train(fam, model, {**section["train"], "data": real, "out": run_dir}, "base")
        last = neon_family.read_checkpoint(fam, finetune.snapshots(run_dir)[-1])
        neon_family.write_checkpoint(fam, last.weights, path, like=last)
    return path


def _synthetic(out: str, fam, base, base_path: str, sampler, section: dict) -> str:
    """S: `section['num']` samples of the base with `sampler`, balanced labels (resumable)."""
    conf = synthetic.SyntheticConfig(out=os.path.join(out, "synthetic"), **section)
    progress.drain(synthetic.write(fam, base, sampler, conf, files.sha256(base_path)), "S")
    return conf.out


def _diagnose(out: str, fam, base, generator: tuple, s_dir: str, section: dict) -> dict:
    """cos_P of the generator images against S at the base (`diagnose.json`)."""
    path = os.path.join(out, "diagnose.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    s_set = synthetic.read(s_dir)
    conf = config.build(diagnose.DiagnoseConfig, section, "diagnose")
    result = diagnose.run(fam, base, generator, (s_set, s_set.labels), conf)
    files.write_json(path, result)
    logger.info(
        "diagnose: cos_P %+.4f [%+.4f, %+.4f]: %s",
        result["cos_p"],
        result["low"],
        result["high"],
        diagnose.ADVICE[result["advice"]],
    )
    return result


def _finetune(run_dir: str, fam, base, data_dir: str, section: dict, desc: str) -> str:
    """A copy of the base fine-tuned on the set at `data_dir` into `run_dir` (nothing is done when its
    last snapshot is there); returns that snapshot."""
    done = finetune.snapshots(run_dir)
    if not done or finetune.images_seen(done[-1]) < section["total_images"]:
        _train(fam, copy.deepcopy(base), {**section, "data": data_dir, "out": run_dir}, desc)
    return finetune.snapshots(run_dir)[-1]


def _train(fam, model, section: dict, desc: str) -> None:
    """`neon.finetune.run` under a progress bar (resumes from the run directory's state)."""
    progress.drain(finetune.run(fam, model, config.build(finetune.FinetuneConfig, section, desc)), desc)


# --- scoring -----------------------------------------------------------------------------------


def _sweep_config(out: str, self_path: str, s: dict) -> sweep.SweepConfig:
    """The sweep of θ_s's last snapshot: the recipe's `sweep` section, its final report on the
    `report` ranges."""
    section, report = dict(s["sweep"]), s["report"]
    return sweep.SweepConfig(
        self_trained=self_path,
        out=os.path.join(out, "sweep"),
        final_num=report["num"],
        final_seeds=report["ranges"],
        final_seed_base=report["seed_base"],
        **section,
    )


def _extra(fam: DigitsFamily, reference: torch.Tensor):
    """`evaluate.Metrics.extra`: the label accuracy (the classifier's head on the features against the
    labels drawn) and precision/recall against the reference images' features."""

    def extra(features: torch.Tensor, labels: torch.Tensor) -> dict:
        predicted = fam.logits(features).argmax(1)
        precision, recall = fid.precision_recall(features, reference)
        return {
            "label_accuracy": (predicted == labels).double().mean().item(),
            "precision": precision,
            "recall": recall,
        }

    return extra


def _controls(fam, model, base_path: str, sampler, conf: sweep.SweepConfig, paths: dict, extra):
    """Progress records; the result: {name: [record per report range]} of each control θ (`paths`),
    scored by `evaluate.evaluate` on the sweep's final ranges. Each record is one line of
    `controls.jsonl` beside results.jsonl, keyed like the sweep's (snapshot, seeds, sampler overrides),
    and is never computed twice."""
    path = os.path.join(conf.out, CONTROLS)
    done = {_control_key(r): r for r in files.read_jsonl(path)}
    jobs = [(name, seeds) for name in paths for seeds in conf.final_ranges()]
    base, metrics, count = None, None, 0
    yield Progress(0, len(jobs), "eval")
    for name, seeds in jobs:
        record = {
            "control": name,
            "snapshot": paths[name],
            "w": None,
            "cfg": None,
            "num": seeds[1],
            "seeds": list(seeds),
            "sampler": conf.overrides(),
        }
        if _control_key(record) not in done:
            if base is None:
                base = neon_family.read_checkpoint(fam, base_path).weights
                metrics = evaluate.Metrics(fam.reference(), extra=extra)
            began = time.time()
            theta = neon_family.read_checkpoint(fam, paths[name]).weights
            scores = evaluate.evaluate(
                fam,
                model,
                base,
                dataclasses.replace(sampler, **conf.sampler),
                seeds,
                conf.batch_size,
                metrics,
                control=theta,
            )
            record = files.finite_json({**record, **scores, "seconds": round(time.time() - began, 3)})
            files.append_jsonl(path, record)
            done[_control_key(record)] = record
        count += 1
        yield Progress(count, len(jobs), "eval")

    def key(name, seeds):
        return _control_key({"snapshot": paths[name], "seeds": list(seeds), "sampler": conf.overrides()})

    result = {name: [done[key(name, seeds)] for seeds in conf.final_ranges()] for name in paths}
    yield Progress(count, len(jobs), "eval", result=result)


def _control_key(record: dict) -> tuple:
    return record["snapshot"], tuple(record["seeds"]), json.dumps(record["sampler"] or {}, sort_keys=True)


def _real(fam: DigitsFamily, real: tuple, num: int, reference: torch.Tensor) -> dict:
    """The `real` row: the first `num` real-role images (no network trained on them), scored as a
    model's samples are: FID against the reference statistics and the same extra metrics."""
    images, labels, _ = real
    if num > len(images):
        raise ValueError(f"the real row needs report.num = {num} real images, the split holds {len(images)}")
    features = fam.features(images[:num])
    scores = _extra(fam, reference)(features, labels[:num])
    return {"num": num, "fid": fid.frechet_distance(fid.statistics(features), fam.reference()), **scores}


def _selection(records: list[dict], conf: sweep.SweepConfig, found: summary.Summary) -> dict:
    """The search's evidence and its curves: (w, FID) at the screening n and at n = num."""
    curves = {}
    for n in sorted({conf.screen(), conf.num}):
        ws, fids = sweep.curve(records, conf, sweep.snapshot_paths(conf)[0], None, n)
        curves[str(n)] = {"w": ws, "fid": fids}
    return {
        "search": conf.search,
        "seeds": [conf.seed_base, conf.num],
        "screen_num": conf.screen(),
        "images": found.selection_images,
        "curves": curves,
        "evidence": found.evidence,
    }


def _stats(stats: dict) -> dict:
    return {m: _asdict(stats[m]) for m in METRICS if m in stats}


def _asdict(value) -> dict | None:
    return None if value is None else dataclasses.asdict(value)


def _agrees(advice: str, best_w: float) -> str:
    """Whether the diagnose's advice has the sign of the chosen w."""
    if advice == "inconclusive" or best_w == 0:
        return "n/a" if best_w == 0 else "inconclusive"
    return "yes" if (advice == "extrapolate") == (best_w > 0) else "no"


def _check_disjoint(ranges: list[tuple[int, int]]) -> None:
    """Seed ranges (start, num) must not overlap (S, selection, report ranges, the picture)."""
    spans = sorted((start, start + num) for start, num in ranges)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"seed ranges overlap: {spans}")


def _pm(summary: dict, digits: int) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['sd'] or 0:.{digits}f}"


# --- pictures ----------------------------------------------------------------------------------


def _pictures(out, fam, model, base_path, self_path, controls, sampler, result, section) -> dict:
    """fid_vs_w.png (the selection curves, the report's mean ± sd, the controls and the real floor)
    and samples.png (base, Neon and the controls on the same seeds and labels)."""
    report, curves = result["report"], {}
    for n, curve in result["selection"]["curves"].items():
        curves[f"selection, n={n} (seeds {result['selection']['seeds'][0]}+)"] = (curve["w"], curve["fid"])
    k, best_w = len(report["seeds"]), result["best_w"]
    curves[f"report: base and Neon, mean ± sd (k={k}, n={report['num']})"] = (
        [0.0, best_w],
        [report["base"]["fid"]["mean"], report["neon"]["fid"]["mean"]],
        [report["base"]["fid"]["sd"] or 0, report["neon"]["fid"]["sd"] or 0],
    )
    ws = [w for curve in result["selection"]["curves"].values() for w in curve["w"]] or [0.0, best_w]
    for name in MODELS[2:]:
        curves[f"{name} (report mean)"] = ([min(ws), max(ws)], [report[name]["fid"]["mean"]] * 2)
    curves[f"real images, n={result['real']['num']}"] = ([min(ws), max(ws)], [result["real"]["fid"]] * 2)
    pictures = {
        "fid_vs_w": plots.fid_vs_w(
            curves, os.path.join(out, "fid_vs_w.png"), ylabel="digits FID", title="digits: FID against w"
        )
    }
    base = neon_family.read_checkpoint(fam, base_path).weights
    self_trained = neon_family.read_checkpoint(fam, self_path).weights
    seeds, rows = (section["seed_base"], section["num"]), {}
    for title, kwargs in [
        ("base", {}),
        (f"Neon w={best_w:+g}", {"self_trained": self_trained, "w": best_w}),
        *[
            (name, {"control": neon_family.read_checkpoint(fam, controls[name]).weights})
            for name in MODELS[2:]
        ],
    ]:
        drawn = evaluate.evaluate(fam, model, base, sampler, seeds, section["num"], None, **kwargs)
        rows[title] = drawn["samples"].permute(0, 2, 3, 1).numpy()
    pictures["samples"] = plots.sample_grid(rows, os.path.join(out, "samples.png"))
    return pictures
