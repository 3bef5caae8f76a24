"""`neon demo digits`: Neon on a real image generator trained on CPU, with held-out selection and
error bars (issue 17). Settings: `configs/digits/edm.yaml` (`SETTINGS`).

Stages, each skipped when its output is complete (a rerun resumes):
1. the digits split and the classifier (`classifier.pt`, its held-out accuracy);
2. the base: a class-conditional EDM trained from scratch on the train split by `neon.finetune.run`
   (the EDM loss; the train split written as a set of the synthetic-set layout, `real/`), copied to
   `base.pt`;
3. S: drawn from the base with the usual sampler (`synthetic/`);
4. `neon.diagnose.run` on the base (train split against S): the predicted sign of w (`diagnose.json`);
5. θ_s: the base fine-tuned on S (`self-train/`), and the matched-compute control: the base
   fine-tuned for the same images, batch and lr on the real train split (`control/`);
6. the w grid scored on the selection seeds (digits FID), the best w chosen there; then base
   (w = 0), Neon (the chosen w) and the control scored on k report seed ranges disjoint from it and
   from S: mean ± sd over the ranges (`evaluations.jsonl`, one line per evaluation, never redone);
7. `results.json`, `fid_vs_w.png` and `samples.png` (base, Neon and control on the same seeds).

Every score goes through `neon.metrics.score.generate_and_score` with the `digits` family's own
features and reference; the label accuracy, precision and recall are computed from the features of
those same samples, kept as they are scored.
"""

import copy
import json
import logging
import os
import statistics
import time

import numpy as np
import torch

from neon import config, diagnose, finetune, log, merge, plots, synthetic
from neon.io import checkpoint, files
from neon import family as neon_family
from neon.metrics import fid, inception, score

from neon.toy.appendix import one_thread

from edm.digits import classifier, data
from edm.digits.family import DigitsFamily

logger = logging.getLogger(__name__)

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "digits", "edm.yaml")
SETTINGS = config.load_yaml(RECIPE)
EVALUATIONS = "evaluations.jsonl"


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
    split = data.split(s["data"]["size"], s["data"]["split_seed"], s["data"]["heldout"])
    net, accuracy = _classifier(out, split, s["classifier"])
    fam = DigitsFamily(net)
    real = data.write_set(os.path.join(out, "real"), *split["train"], fam.name)
    base_path = _base(out, fam, real, s["base"])
    base = fam.load(base_path)
    sampler = fam.Sampler(**s["sampler"])
    s_dir = _synthetic(out, fam, base, base_path, sampler, s["synthetic"])
    diagnosis = _diagnose(out, fam, base, split["train"], s_dir, s["diagnose"])
    self_path = _finetune(os.path.join(out, "self-train"), fam, base_path, s_dir, s["self_train"], "θ_s on S")
    control_path = _finetune(os.path.join(out, "control"), fam, base_path, real, s["self_train"], "control on real")

    scorer = _Scorer(out, fam, base, sampler, s["sweep"]["batch_size"], split["heldout"][0],
                     {"base": base_path, "self": self_path, "control": control_path})
    ws = [float(w) for w in s["sweep"]["w"]]
    selection = (s["sweep"]["seed_base"], s["sweep"]["num"])
    ranges = [(seed, s["report"]["num"]) for seed in s["report"]["seed_bases"]]
    _check_disjoint([(s["synthetic"]["seed_base"], s["synthetic"]["num"]), selection, *ranges,
                     (s["samples"]["seed_base"], s["samples"]["num"])])
    jobs = [("neon", w, selection) for w in ws]
    bar = log.progress(total=len(ws) + 3 * len(ranges), unit="eval", desc="scoring")
    curve = [scorer.score(*job, bar) for job in jobs]
    best_w = ws[int(np.argmin([r["fid"] for r in curve]))]
    report = {name: [scorer.score(name if name == "control" else "neon", w, seeds, bar) for seeds in ranges]
              for name, w in (("base", 0.0), ("neon", best_w), ("control", None))}
    bar.close()

    real_scores = _real_scores(fam, split, s["report"]["num"], scorer.heldout)
    result = {
        "settings": s,
        "classifier": {"heldout_accuracy": accuracy, "features": classifier.FEATURES},
        "real_train": real_scores,
        "diagnose": diagnosis,
        "selection": {"seeds": list(selection), "w": ws, **{k: [r[k] for r in curve] for k in _METRICS}},
        "best_w": best_w,
        "report": {"seeds": [list(r) for r in ranges],
                   **{name: _summary(rows) for name, rows in report.items()}},
    }
    result["diagnose"]["agrees_with_best_w"] = _agrees(diagnosis["advice"], best_w)
    result["comparisons"] = {f"neon_vs_{other}": _paired(report["neon"], report[other])
                             for other in ("base", "control")}
    result["files"] = _pictures(out, fam, base, sampler, scorer, best_w, curve, ws, result, s["samples"])
    result["seconds"] = round(time.time() - start, 1)
    files.write_json(os.path.join(out, "results.json"), result)
    return result


def table(result: dict) -> str:
    """The printed table: base, Neon and control, each mean ± sd over the report ranges."""
    k = len(result["report"]["seeds"])
    lines = [f"{'model':<9} {'w':>6}  {f'digits FID (k={k})':>18}  {'label accuracy':>16}  "
             f"{'precision':>15}  {'recall':>15}"]
    for name, w in (("base", 0.0), ("neon", result["best_w"]), ("control", None)):
        row = result["report"][name]
        cells = [_pm(row[key], digits) for key, digits in (("fid", 2), ("label_accuracy", 3), ("precision", 3),
                                                           ("recall", 3))]
        lines.append(f"{name:<9} {'-' if w is None else f'{w:+.2f}':>6}  {cells[0]:>18}  {cells[1]:>16}  "
                     f"{cells[2]:>15}  {cells[3]:>15}")
    real = result["real_train"]
    lines.append(f"{'real':<9} {'-':>6}  {real['fid']:>18.2f}  {real['label_accuracy']:>16.3f}  "
                 f"{real['precision']:>15.3f}  {real['recall']:>15.3f}")
    for other in ("base", "control"):
        c = result["comparisons"][f"neon_vs_{other}"]
        lines.append(f"Neon − {other}, paired by range: FID {_pm(c['fid'], 2)}, label accuracy "
                     f"{c['label_accuracy']['mean']:+.3f} ± {c['label_accuracy']['sd']:.3f}: {c['verdict']}")
    d = result["diagnose"]
    lines.append(f"classifier held-out accuracy {result['classifier']['heldout_accuracy']:.3f}; diagnose cos_P "
                 f"{d['cos_p']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['advice']}); "
                 f"best w {result['best_w']:+.2f}")
    return "\n".join(lines)


# --- stages ------------------------------------------------------------------------------------


def _classifier(out: str, split: dict, section: dict) -> tuple[classifier.Classifier, float]:
    """The feature network (trained once, `classifier.pt`) and its held-out accuracy."""
    path = os.path.join(out, "classifier.pt")
    conf = config.build(classifier.ClassifierConfig, section, "classifier")
    size = split["train"][0].shape[-1]
    if os.path.exists(path):
        net = classifier.build(size)
        net.load_state_dict(checkpoint.read(path).weights)
        net.eval().requires_grad_(False)
    else:
        net = classifier.train(*split["train"], conf)
        checkpoint.write({"state_dict": net.state_dict(), "config": config.to_dict(conf)}, path)
    accuracy = classifier.accuracy(net, *split["heldout"])
    logger.info("classifier: held-out accuracy %.4f", accuracy)
    return net, accuracy


def _base(out: str, fam: DigitsFamily, real: str, section: dict) -> str:
    """`base.pt`: the EDM trained from scratch on the real train split (its last snapshot: the EMA)."""
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
    bar = log.progress(total=conf.num, unit="img", desc="S")
    for record in synthetic.write(fam, base, sampler, conf, files.sha256(base_path)):
        bar.update(record.done - bar.n)
    bar.close()
    return conf.out


def _diagnose(out: str, fam, base, train: tuple, s_dir: str, section: dict) -> dict:
    """cos_P of the real train split against S at the base (`diagnose.json`)."""
    path = os.path.join(out, "diagnose.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    s_set = synthetic.read(s_dir)
    result = diagnose.run(fam, base, train, (s_set, s_set.labels), config.build(diagnose.DiagnoseConfig, section,
                                                                                    "diagnose"))
    files.write_json(path, result)
    logger.info("diagnose: cos_P %+.4f [%+.4f, %+.4f]: %s", result["cos_p"], result["low"], result["high"],
                diagnose.ADVICE[result["advice"]])
    return result


def _finetune(run_dir: str, fam, base_path: str, data_dir: str, section: dict, desc: str) -> str:
    """The base fine-tuned on the set at `data_dir` into `run_dir`; returns its last snapshot."""
    _train(fam, fam.load(base_path), {**section, "data": data_dir, "out": run_dir}, desc)
    return finetune.snapshots(run_dir)[-1]


def _train(fam, model, section: dict, desc: str) -> None:
    """`neon.finetune.run` with a progress bar (resumes from the run directory's state)."""
    conf = config.build(finetune.FinetuneConfig, section, desc)
    bar = log.progress(total=conf.total_images, unit="img", desc=desc)
    for record in finetune.run(fam, model, conf):
        bar.update(record.done - bar.n)
    bar.close()


# --- scoring -----------------------------------------------------------------------------------

_METRICS = ("fid", "label_accuracy", "precision", "recall")


class _Keeping:
    """A family that keeps the features of every batch it is asked to score (in call order), so the
    label accuracy and precision/recall come from the very samples `generate_and_score` scored."""

    def __init__(self, fam):
        self.fam, self.kept = fam, []

    def __getattr__(self, name):
        return getattr(self.fam, name)

    def features(self, samples):
        features = self.fam.features(samples)
        self.kept.append(features)
        return features


class _Scorer:
    """Scores θ_neon(w) (w = 0: the base) or the control on a seed range; each result is one line of
    `evaluations.jsonl`, keyed by the checkpoints' sha256, and is never computed twice."""

    def __init__(self, out, fam, model, sampler, batch_size, heldout_images, paths):
        self.path = os.path.join(out, EVALUATIONS)
        self.fam, self.model, self.sampler, self.batch_size = fam, model, sampler, batch_size
        self.heldout = fam.features(heldout_images)
        self.paths = paths
        self.ids = {name: files.sha256(p)[:16] for name, p in paths.items()}
        self.thetas = {}
        self.done = {self._key(r): r for r in files.read_jsonl(self.path)}

    def score(self, name: str, w: float | None, seeds: tuple[int, int], bar=None) -> dict:
        """{fid, label_accuracy, precision, recall} of model `name` ('neon' at w, 'control') on seeds."""
        record = {"model": name, "w": w, "seeds": list(seeds),
                  "ckpt": [self.ids["control"]] if name == "control" else [self.ids["base"], self.ids["self"]]}
        key = self._key(record)
        if key not in self.done:
            began = time.time()
            self.model.net.load_state_dict(self.theta(name, w))
            keeping = _Keeping(self.fam)
            fid_only = score.generate_and_score(keeping, self.model, self.sampler, seeds, self.batch_size,
                                                inception.FidConfig(), self.fam.reference())
            record.update(fid_only, **_from_features(self.fam, torch.cat(keeping.kept), seeds, self.model.num_classes,
                                                     self.heldout), seconds=round(time.time() - began, 2))
            files.append_jsonl(self.path, record)
            self.done[key] = record
            logger.info("%s w=%s seeds %s: FID %.3f, label accuracy %.3f", name, w, list(seeds), record["fid"],
                        record["label_accuracy"])
        if bar is not None:
            bar.update(1)
        return self.done[key]

    def theta(self, name: str, w: float | None) -> dict:
        """θ of the control, or θ_neon = (1 + w) θ_base − w θ_s."""
        if not self.thetas:
            self.thetas = {k: neon_family.read_checkpoint(self.fam, p).weights for k, p in self.paths.items()}
        if name == "control":
            return self.thetas["control"]
        return merge.extrapolate(self.thetas["base"], self.thetas["self"], w)

    @staticmethod
    def _key(record: dict) -> tuple:
        return record["model"], record["w"], tuple(record["seeds"]), tuple(record["ckpt"])


def _from_features(fam, features: torch.Tensor, seeds: tuple[int, int], num_classes: int,
                   heldout: torch.Tensor) -> dict:
    """Label accuracy (the classifier's head on the features against the labels generate_and_score
    drew: balanced, shuffled by the first seed) and precision/recall against the held-out features."""
    labels = synthetic.balanced_labels(seeds[1], num_classes, seeds[0])
    with torch.no_grad():
        predicted = fam.classifier().head(features.float()).argmax(1)
    precision, recall = fid.precision_recall(features, heldout)
    return {"label_accuracy": (predicted == labels).double().mean().item(), "precision": precision, "recall": recall}


def _real_scores(fam, split: dict, num: int, heldout: torch.Tensor) -> dict:
    """The same metrics for `num` real train images (a permutation by seed 0): what a perfect
    generator would score at this sample size."""
    images, labels = split["train"]
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:num]
    features = fam.features(images[pick])
    with torch.no_grad():
        predicted = fam.classifier().head(features.float()).argmax(1)
    precision, recall = fid.precision_recall(features, heldout)
    return {"num": len(pick), "fid": fid.frechet_distance(fid.statistics(features), fam.reference()),
            "label_accuracy": (predicted == labels[pick]).double().mean().item(), "precision": precision,
            "recall": recall}


def _summary(rows: list[dict]) -> dict:
    """Per metric: the values over the report ranges, their mean and sample sd."""
    out = {}
    for key in _METRICS:
        values = [r[key] for r in rows]
        out[key] = {"values": values, "mean": statistics.fmean(values),
                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    out["w"] = rows[0]["w"]
    return out


def _paired(rows: list[dict], others: list[dict]) -> dict:
    """Differences rows − others range by range (the same seeds and labels: the ranges' own
    difficulty cancels), their mean and sd per metric, and the verdict on FID: 'better' ('worse')
    when it is lower (higher) on every range and mean ± sd excludes 0, else 'within the seed spread'."""
    out = {}
    for key in ("fid", "label_accuracy"):
        d = [a[key] - b[key] for a, b in zip(rows, others)]
        out[key] = {"differences": d, "mean": statistics.fmean(d), "sd": statistics.stdev(d) if len(d) > 1 else 0.0}
    d = out["fid"]
    out["verdict"] = ("better" if max(d["differences"]) < 0 and d["mean"] + d["sd"] < 0 else
                      "worse" if min(d["differences"]) > 0 and d["mean"] - d["sd"] > 0 else "within the seed spread")
    return out


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
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}"


# --- pictures ----------------------------------------------------------------------------------


def _pictures(out, fam, model, sampler, scorer, best_w, curve, ws, result, section) -> dict:
    """fid_vs_w.png (the selection curve, the report's mean ± sd, the control) and samples.png (base,
    Neon and control on the same seeds and labels)."""
    report = result["report"]
    curves = {f"selection (seeds {curve[0]['seeds'][0]}+)": (ws, [r["fid"] for r in curve]),
              f"report: base and Neon, mean ± sd (k={len(report['seeds'])})":
                  ([0.0, best_w], [report["base"]["fid"]["mean"], report["neon"]["fid"]["mean"]],
                   [report["base"]["fid"]["sd"], report["neon"]["fid"]["sd"]]),
              "control: fine-tuned on real (report mean)":
                  ([min(ws), max(ws)], [report["control"]["fid"]["mean"]] * 2)}
    files = {"fid_vs_w": plots.fid_vs_w(curves, os.path.join(out, "fid_vs_w.png"), ylabel="digits FID",
                                        title="digits: FID against w")}
    seeds = torch.arange(section["num"]) + section["seed_base"]
    labels = torch.arange(section["num"]) % model.num_classes
    rows = {}
    for title, name, w in (("base", "neon", 0.0), (f"Neon w={best_w:+g}", "neon", best_w),
                           ("control", "control", None)):
        model.net.load_state_dict(scorer.theta(name, w))
        rows[title] = fam.sample(model, labels, seeds, sampler).permute(0, 2, 3, 1).numpy()
    files["samples"] = plots.sample_grid(rows, os.path.join(out, "samples.png"))
    return files
