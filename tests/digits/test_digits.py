"""The digits experiment (issues 17, 27): the data split, the classifier, the `digits` family and a
reduced run of `neon demo digits`.

The base's label accuracy (>= 80 %) needs the full run's training (minutes): it is measured there
and reported in the README, not here; the reduced run checks the pipeline and the file contents.
"""

import json
import os

import pytest
import torch

from edm.digits import classifier, data, demo
from edm.digits.family import TINY, DigitsFamily
from edm.family import family as edm
from neon import config, evaluate, synthetic
from neon.io import checkpoint
from neon.metrics import fid, inception, score
from neon.threads import one_thread

# The reduced run: the tiny network, a shorter classifier, a few hundred images, 5 report ranges of 30.
SMALL = {
    "base.arch": TINY,
    "classifier.epochs": 15,
    "base.train.total_images": 320,
    "synthetic.num": 60,
    "synthetic.batch_size": 60,
    "self_train.total_images": 96,
    "diagnose.batches": 2,
    "sampler.num_steps": 3,
    "sweep.w": [0.0, 1.0],
    "sweep.num": 30,
    "sweep.screen_num": 30,
    "report.num": 30,
    "samples.num": 10,
}


@pytest.fixture(scope="module")
def split():
    return data.split()


@pytest.fixture(scope="module")
def trained(split):
    """The classifier with the recipe's settings, and its held-out accuracy."""
    with one_thread():
        conf = config.build(classifier.ClassifierConfig, demo.SETTINGS["classifier"], "classifier")
        net = classifier.train(*split["features"][:2], conf)
    unseen = [split[role] for role in ("generator", "reference", "real")]
    return net, classifier.accuracy(net, torch.cat([u[0] for u in unseen]), torch.cat([u[1] for u in unseen]))


def test_split_is_fixed_disjoint_and_grey(split):
    assert {role: len(split[role][0]) for role in data.ROLES} == {
        "generator": 1000,
        "features": 300,
        "reference": 297,
        "real": 200,
    }
    indices = torch.cat([split[role][2] for role in data.ROLES])
    assert sorted(indices.tolist()) == list(range(1797))  # every image in exactly one role
    images, labels = data.load()
    for role in data.ROLES:
        index = split[role][2]
        assert torch.equal(split[role][0], images[index]) and torch.equal(split[role][1], labels[index])
        assert split[role][0].dtype == torch.uint8 and split[role][1].dtype == torch.int64
        assert set(split[role][1].tolist()) == set(range(10))
    assert torch.equal(images[:, 0], images[:, 2])  # three equal channels
    assert torch.equal(data.split()["reference"][2], split["reference"][2])  # a function of its seed
    with pytest.raises(Exception, match="leave"):
        data.split(features=900, reference=900)


def test_the_recipe_s_classifier_is_the_one_the_family_trains():
    assert (
        config.build(classifier.ClassifierConfig, demo.SETTINGS["classifier"], "classifier")
        == classifier.ClassifierConfig()
    )


@pytest.mark.numerics
def test_classifier_reaches_95_percent_on_the_digits_it_never_saw(trained):
    # Measured 0.977 (300 images, 60 epochs); 0.95 leaves room for other float kernels.
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
    # the features are the classifier's live penultimate directions whitened by the reference images:
    # their statistics on the reference are 0 and the identity, and the head still reads them
    features = fam.features(split["reference"][0][:10])
    dims = fam.whitening()[1].shape[1]
    assert features.dtype == torch.float64 and features.shape == (10, dims)
    assert 10 <= dims <= classifier.FEATURES
    mu, sigma = fam.reference()
    assert mu.shape == (dims,) and sigma.shape == (dims, dims)
    assert abs(mu).max() < 1e-9 and abs(sigma - torch.eye(dims).numpy()).max() < 1e-9
    digits = torch.cat([split[role][0] for role in data.ROLES])
    with torch.no_grad():
        logits = trained[0](digits)
    assert torch.allclose(fam.logits(fam.features(digits)), logits, rtol=1e-4, atol=1e-4)
    # The core's scoring path uses the family's features and reference: no --ref, no Inception.
    result = score.generate_and_score(
        fam, model, sampler, (0, 20), 10, inception.FidConfig(), fam.reference()
    )
    assert result["fid"] > 0
    real = fam.features(split["generator"][0][:500])
    floor = fid.frechet_distance(fid.statistics(real), (mu, sigma))
    assert floor < 0.5 * result["fid"], (
        floor,
        result["fid"],
    )  # real digits score far better than a random net


@pytest.mark.numerics
def test_reduced_run_writes_its_results_and_resumes(tmp_path):
    out = str(tmp_path / "digits")
    result = demo.run(out, quick=True, overrides=SMALL)
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == json.loads(json.dumps(result))
    s = saved["settings"]
    assert s["base"]["arch"] == TINY and "quick" not in s

    # no image plays two roles; the classifier trained on its 300 only (shorter here: the recipe's
    # reaches 0.95)
    roles = saved["split"]
    assert sorted(i for role in data.ROLES for i in roles[role]) == list(range(1797))
    assert saved["classifier"]["heldout_accuracy"] >= 0.8

    # S, selection and k >= 5 report ranges of the same n: disjoint seeds
    selection, ranges = saved["selection"]["seeds"], saved["report"]["seeds"]
    assert ranges == [[s["report"]["seed_base"] + i * 30, 30] for i in range(5)]
    spans = sorted(
        [(a, a + n) for a, n in [selection, *ranges, [s["synthetic"]["seed_base"], s["synthetic"]["num"]]]]
    )
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:])), spans

    # the chosen w is the selection's minimum at n = num; the report holds k values per metric and model
    curve = saved["selection"]["curves"]["30"]
    assert curve["w"] == SMALL["sweep.w"]
    assert saved["best_w"] == curve["w"][curve["fid"].index(min(curve["fid"]))]
    for name in demo.MODELS:
        row = saved["report"][name]
        for metric in demo.METRICS:
            assert len(row[metric]["values"]) == len(ranges)
            assert row[metric]["mean"] == pytest.approx(sum(row[metric]["values"]) / len(ranges))
        assert all(v > 0 for v in row["fid"]["values"]) and all(
            0 <= v <= 1 for v in row["label_accuracy"]["values"]
        )
    assert saved["report"]["neon"]["w"] == saved["best_w"] and saved["report"]["base"]["w"] == 0.0

    # the real row: n real images no network saw, scored like a model: the floor (a tiny base is far above)
    real = saved["real"]
    assert real["num"] == 30
    assert real["fid"] < 0.5 * min(saved["report"][m]["fid"]["mean"] for m in demo.MODELS)
    assert real["label_accuracy"] >= 0.9
    assert saved["diagnose"]["advice"] in ("extrapolate", "interpolate", "inconclusive")

    # the comparisons: the paired differences and their 95% interval, as neon.evaluate computes them
    for other in ("base", "control", "control_ema"):
        c = saved["comparisons"][f"neon_vs_{other}"]
        report = saved["report"]
        expected = evaluate.paired(report["neon"]["fid"]["values"], report[other]["fid"]["values"])
        assert c["fid"]["differences"] == pytest.approx(expected.differences)
        assert [c["fid"][key] for key in ("mean", "low", "high")] == pytest.approx(
            [expected.mean, expected.low, expected.high]
        )
        assert c["verdict"] == evaluate.verdict(expected)

    # the controls saw as many images as θ_s, on the generator images; one of them kept an EMA
    snapshot = "snapshot-0000000096.pt"
    seen = [
        checkpoint.read(os.path.join(out, d, snapshot)).data["images_seen"]
        for d in ("self-train", "control", "control-ema")
    ]
    assert seen == [SMALL["self_train.total_images"]] * 3
    assert synthetic.read(os.path.join(out, "real")).manifest["num"] == 1000
    assert len(synthetic.read(os.path.join(out, "synthetic"))) == SMALL["synthetic.num"]
    for name in ("fid_vs_w.png", "samples.png", "base.pt", "classifier.pt", "diagnose.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name

    table = demo.table(saved).splitlines()
    assert [line.split()[0] for line in table[1:9]] == [
        "base",
        "neon",
        "control",
        "control_ema",
        "real",
        "Neon",
        "Neon",
        "Neon",
    ]
    assert "±" in table[1] and "[" in table[6]

    # a rerun computes nothing again: the same evaluation lines, the same base
    logs = [os.path.join(out, "sweep", name) for name in ("results.jsonl", demo.CONTROLS)]
    before = [open(p).read() for p in logs]
    base_mtime = os.stat(os.path.join(out, "base.pt")).st_mtime_ns
    again = demo.run(out, quick=True, overrides=SMALL)
    assert [open(p).read() for p in logs] == before
    assert os.stat(os.path.join(out, "base.pt")).st_mtime_ns == base_mtime
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in result.items() if k != "seconds"
    }


def test_the_old_spelling_neon_demo_dash_dash_digits_still_works(capsys):
    from neon import cli

    printed = []
    for argv in (["demo", "digits", "--dry-run"], ["demo", "--digits", "--dry-run"]):
        cli.main(argv)
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0].startswith("demo: digits\n")


@pytest.mark.parametrize("tool, takes_out", [(["-m", "edm.digits.benchmark"], True),
                                             (["benchmarks/digits_metric_power.py"], False)])
def test_the_tools_that_reuse_a_demo_refuse_a_folder_without_one(tmp_path, tool, takes_out):
    """Given a folder that holds no finished demo, they stop before the classifier would be trained
    into it: exit 2 with the reason on the last line, and nothing written."""
    import subprocess
    import sys

    from tests.conftest import REPO

    missing, out = tmp_path / "no-demo", tmp_path / "variants"
    argv = [sys.executable, *tool, str(missing)] + ([str(out)] if takes_out else [])
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    reason = f"{missing / 'results.json'} not found: give the directory of a finished `neon demo digits` run"
    assert result.stderr.splitlines()[-1].endswith(f"error: {reason}")
    assert list(tmp_path.iterdir()) == []
