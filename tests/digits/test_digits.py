"""The digits experiment (issue 17): the data split, the classifier, the `digits` family and a reduced
run of `neon demo digits`.

The base's label accuracy (>= 80 %) needs the full run's training (minutes): it is measured there
and reported in the README, not here; the reduced run checks the pipeline and the file contents.
"""

import json
import os

import pytest
import torch

from neon import config, synthetic
from neon.io import checkpoint
from neon.metrics import fid, inception, score
from neon.toy import appendix

from edm.digits import classifier, data, demo
from edm.digits.family import TINY, DigitsFamily
from edm.family import family as edm

# The reduced run: the tiny network, a few hundred images, 3 report ranges of 30 samples.
SMALL = {"base.arch": TINY, "base.train.total_images": 320, "synthetic.num": 60, "synthetic.batch_size": 60,
         "self_train.total_images": 96, "diagnose.batches": 2, "sampler.num_steps": 3, "sweep.w": [0.0, 1.0],
         "sweep.num": 30, "report.num": 30, "samples.num": 10}


@pytest.fixture(scope="module")
def split():
    return data.split()


@pytest.fixture(scope="module")
def trained(split):
    """The classifier with the recipe's settings, and its held-out accuracy."""
    with appendix.one_thread():
        net = classifier.train(*split["train"], config.build(classifier.ClassifierConfig,
                                                             demo.SETTINGS["classifier"], "classifier"))
    return net, classifier.accuracy(net, *split["heldout"])


def test_split_is_fixed_disjoint_and_grey(split):
    train, heldout = split["train"], split["heldout"]
    assert train[0].shape == (1200, 3, 16, 16) and heldout[0].shape == (597, 3, 16, 16)
    assert train[0].dtype == torch.uint8 and train[1].dtype == torch.int64
    assert torch.equal(train[0][:, 0], train[0][:, 2])  # three equal channels
    assert set(train[1].tolist()) == set(range(10)) and min(torch.bincount(heldout[1]).tolist()) >= 45
    again = data.split()
    assert torch.equal(again["heldout"][0], heldout[0])  # the split is a function of its seed
    everything = torch.cat([train[0], heldout[0]]).flatten(1)
    assert len(torch.unique(everything, dim=0)) >= 1790  # no image on both sides beyond the dataset's few duplicates


def test_the_recipe_s_classifier_is_the_one_the_family_trains():
    assert config.build(classifier.ClassifierConfig, demo.SETTINGS["classifier"], "classifier") == \
        classifier.ClassifierConfig()


@pytest.mark.numerics
def test_classifier_reaches_95_percent_on_held_out(trained):
    # Measured 0.982 (8 epochs); 0.95 leaves room for other float kernels.
    assert trained[1] >= 0.95, trained[1]


@pytest.mark.numerics
def test_digits_family_is_edm_plus_features_and_reference(trained, split, one_thread):
    fam = DigitsFamily(trained[0])
    model = fam.tiny(0)
    labels, seeds = torch.arange(6) % 10, torch.arange(6) + 5
    sampler = fam.Sampler(num_steps=3)
    images = fam.sample(model, labels, seeds, sampler)
    assert torch.equal(images, edm.sample(model, labels, seeds, sampler))  # sampling is the EDM family's
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    features = fam.features(split["heldout"][0][:10])
    assert features.dtype == torch.float64 and features.shape == (10, classifier.FEATURES)
    mu, sigma = fam.reference()
    assert mu.shape == (classifier.FEATURES,) and sigma.shape == (classifier.FEATURES,) * 2
    # The core's scoring path uses the family's features and reference: no --ref, no Inception.
    result = score.generate_and_score(fam, model, sampler, (0, 20), 10, inception.FidConfig(), fam.reference())
    assert result["fid"] > 0
    real = fam.features(split["train"][0][:500])
    floor = fid.frechet_distance(fid.statistics(real), (mu, sigma))
    assert floor < 0.5 * result["fid"], (floor, result["fid"])  # real digits score far better than a random net


@pytest.mark.numerics
def test_reduced_run_writes_its_results_and_resumes(tmp_path):
    out = str(tmp_path / "digits")
    result = demo.run(out, quick=True, overrides=SMALL)
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == json.loads(json.dumps(result))
    s = saved["settings"]
    assert s["base"]["arch"] == TINY and "quick" not in s

    # the classifier is the real one, trained on the train split
    assert saved["classifier"]["heldout_accuracy"] >= 0.95

    # selection and report seed ranges (and S) are disjoint
    selection = saved["selection"]["seeds"]
    ranges = saved["report"]["seeds"]
    spans = sorted([(a, a + n) for a, n in [selection, *ranges, [s["synthetic"]["seed_base"], s["synthetic"]["num"]]]])
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:])), spans
    assert len(ranges) >= 3 and all(n == SMALL["report.num"] for _, n in ranges)

    # the chosen w is the selection curve's minimum, and the report holds k values per metric
    assert saved["selection"]["w"] == SMALL["sweep.w"]
    assert saved["best_w"] == SMALL["sweep.w"][min(range(2), key=lambda i: saved["selection"]["fid"][i])]
    for name in ("base", "neon", "control"):
        row = saved["report"][name]
        for metric in ("fid", "label_accuracy", "precision", "recall"):
            values = row[metric]["values"]
            assert len(values) == len(ranges)
            assert row[metric]["mean"] == pytest.approx(sum(values) / len(values))
        assert all(v > 0 for v in row["fid"]["values"]) and all(0 <= v <= 1 for v in row["label_accuracy"]["values"])
    assert saved["report"]["neon"]["w"] == saved["best_w"] and saved["report"]["base"]["w"] == 0.0
    # a base trained on 320 images is far from real digits; the real train split is close to held-out
    assert saved["real_train"]["fid"] < 0.5 * saved["report"]["base"]["fid"]["mean"]
    assert saved["real_train"]["label_accuracy"] >= 0.95
    assert saved["diagnose"]["advice"] in ("extrapolate", "interpolate", "inconclusive")
    assert saved["diagnose"]["low"] <= saved["diagnose"]["cos_p"] <= saved["diagnose"]["high"]
    for other in ("base", "control"):
        c = saved["comparisons"][f"neon_vs_{other}"]
        differences = [a - b for a, b in zip(saved["report"]["neon"]["fid"]["values"],
                                             saved["report"][other]["fid"]["values"])]
        assert c["fid"]["differences"] == pytest.approx(differences)
        assert c["verdict"] in ("better", "worse", "within the seed spread")

    # the control saw as many images as θ_s, on the real split
    self_run = checkpoint.read(os.path.join(out, "self-train", "snapshot-0000000096.pt")).data
    control = checkpoint.read(os.path.join(out, "control", "snapshot-0000000096.pt")).data
    assert self_run["images_seen"] == control["images_seen"] == SMALL["self_train.total_images"]
    assert synthetic.read(os.path.join(out, "real")).manifest["num"] == 1200
    assert len(synthetic.read(os.path.join(out, "synthetic"))) == SMALL["synthetic.num"]
    for name in ("fid_vs_w.png", "samples.png", "base.pt", "classifier.pt", "diagnose.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name

    table = demo.table(saved).splitlines()
    assert [line.split()[0] for line in table[1:7]] == ["base", "neon", "control", "real", "Neon", "Neon"]
    assert "±" in table[1]

    # a rerun computes nothing again: same evaluations, same base
    evaluations = open(os.path.join(out, demo.EVALUATIONS)).read()
    base_mtime = os.stat(os.path.join(out, "base.pt")).st_mtime_ns
    again = demo.run(out, quick=True, overrides=SMALL)
    assert open(os.path.join(out, demo.EVALUATIONS)).read() == evaluations
    assert os.stat(os.path.join(out, "base.pt")).st_mtime_ns == base_mtime
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
