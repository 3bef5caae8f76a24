"""Metrics: our in-memory Inception path against torch-fidelity on the same files, the reference
statistics files, the image sources and the CLI's error contract.

There is no internet here, so the tests build their own InceptionV3 weights: every parameter filled
by `tests/golden/fill.py`, then the batch-norm statistics recalibrated on a few images (without
that the network collapses: every image gets the same features). Both our extractor and
`torch_fidelity.calculate_metrics` read that one file. Inception costs ~6 GFLOP per image at
299 px whatever the input size, so the sets are a dozen 32×32 images.
"""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from neon import cli, distributed, family, synthetic
from neon.errors import NeonError
from neon.io import files
from neon.metrics import fid, images, inception, score, stats
from tests.conftest import inception_weights, noise, smooth


def write_folder(directory, batch: torch.Tensor) -> str:
    os.makedirs(directory, exist_ok=True)
    for i, image in enumerate(batch.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(os.path.join(directory, f"{i:06d}.png"))
    return str(directory)


def write_npz(path, batch: torch.Tensor, key: str = "arr_0", compressed: bool = False) -> str:
    (np.savez_compressed if compressed else np.savez)(path, **{key: batch.permute(0, 2, 3, 1).numpy()})
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return inception_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A: 12 smooth images (PNG folder and .npz); B: 3 smooth + 3 noise images (folder and .npz)."""
    root = tmp_path_factory.mktemp("sets")
    a, b = smooth(12, 1), torch.cat([smooth(3, 2), noise(3, 3)])
    return {
        "a": write_folder(root / "a", a),
        "a_npz": write_npz(root / "a.npz", a),
        "b": write_folder(root / "b", b),
        "b_npz": write_npz(root / "b.npz", b, key="samples"),
    }


@pytest.fixture(scope="module")
def reference_b(weights, sets, tmp_path_factory):
    """`neon fid-stats` of set B (the PNG folder)."""
    out = str(tmp_path_factory.mktemp("ref") / "b_stats.npz")
    cli.main(
        [
            "fid-stats",
            "--images",
            sets["b"],
            "--out",
            out,
            "--inception-weights",
            weights,
            "--batch-size",
            "4",
        ]
    )
    return out


def _fid_json(capsys, *argv) -> dict:
    capsys.readouterr()
    cli.main(["fid", *argv])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_metrics_equal_torch_fidelity_on_the_same_files(weights, sets, reference_b, capsys):
    import torch_fidelity

    ours = _fid_json(
        capsys,
        "--images",
        sets["a_npz"],
        "--ref",
        reference_b,
        "--is",
        "--pr",
        sets["b"],
        "--inception-weights",
        weights,
        "--batch-size",
        "8",
    )
    theirs = torch_fidelity.calculate_metrics(
        input1=sets["a"],
        input2=sets["b"],
        cuda=False,
        isc=True,
        fid=True,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=weights,
        prc_neighborhood=5,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    assert ours["num"] == 12 and ours["num_real"] == 6
    pairs = {
        "fid": "frechet_inception_distance",
        "is": "inception_score_mean",
        "is_std": "inception_score_std",
        "precision": "precision",
        "recall": "recall",
    }
    for key, their_key in pairs.items():
        assert ours[key] == pytest.approx(theirs[their_key], rel=1e-4, abs=1e-12), key
    # the weights are informative: the sets are far apart and the scores are not degenerate
    assert ours["fid"] > 10 and ours["is"] > 1 and ours["is_std"] > 0 and 0 < ours["precision"] < 1


def test_fid_of_a_set_against_its_own_statistics_is_zero(weights, sets, reference_b, capsys):
    # the .npz and the folder hold the same images; the statistics came from the folder
    result = _fid_json(
        capsys, "--images", sets["b_npz"], "--ref", reference_b, "--inception-weights", weights
    )
    assert abs(result["fid"]) < 1e-6 and result["num"] == 6


class FakeInception(torch.nn.Module):
    """Cheap stand-in for the extractor: per-image channel means as 'pool' and 'logits'."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        means = x.float().mean(dim=(2, 3)) * self.scale
        return means.repeat(1, 683)[:, :2048], means.repeat(1, 336)


def test_extract_gathers_features_in_index_order_for_any_world_size(tmp_path, monkeypatch):
    source = images.source(write_npz(tmp_path / "x.npz", torch.cat([smooth(4, 0), noise(3, 1)])))
    *steps, last = inception.extract(FakeInception(), source, batch_size=2)
    assert [s.done for s in steps] == [2, 4, 6, 7] and all(s.total == 7 for s in steps)  # cumulative
    # two ranks, simulated in turn: rank 1 takes batches 1 and 3, rank 0 batches 0 and 2
    parts = {}
    monkeypatch.setattr(distributed, "world", lambda: 2)
    for rank in (1, 0):

        def gather(mine, rank=rank):  # rank 1 runs first, so rank 0 sees both parts
            parts[rank] = mine
            return [parts.get(0, []), parts[1]]

        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "gather_objects", gather)
        *rank_steps, gathered = inception.extract(FakeInception(), source, batch_size=2)
    assert [s.done for s in rank_steps] == [4, 7]  # rank 0's bar counts both ranks' images per round
    for key in ("pool", "logits"):
        assert torch.equal(gathered.result[key], last.result[key])
    # features of batches of 2 against one batch of 7: equal within float tolerance (DESIGN.md, Determinism)
    torch.testing.assert_close(last.result["pool"][:, :3], source.read(range(0, 7)).float().mean(dim=(2, 3)))


def test_frechet_distance_is_torch_fidelitys_and_exact_on_singular_covariances():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    def theirs(a, b):
        return fid_statistics_to_metric({"mu": a[0], "sigma": a[1]}, {"mu": b[0], "sigma": b[1]}, False)[
            "frechet_inception_distance"
        ]

    g = np.random.default_rng(0)
    full_a, full_b = (
        fid.statistics(g.normal(size=(400, 64)) * 2 + 1),
        fid.statistics(g.normal(size=(400, 64))),
    )
    assert fid.frechet_distance(full_a, full_b) == theirs(full_a, full_b)  # full rank: handed over as it is
    few_a, few_b = fid.statistics(g.normal(size=(8, 64)) * 2 + 1), fid.statistics(g.normal(size=(8, 64)))
    assert fid.frechet_distance(few_a, few_b) == pytest.approx(theirs(few_a, few_b), rel=1e-6)
    assert abs(fid.frechet_distance(few_a, few_a)) < 1e-10 < abs(theirs(few_a, few_a))
    # singular covariances whose span misses part of the mean difference
    a = (np.array([1.0, 2.0, 0.0]), np.diag([4.0, 0.0, 0.0]))
    b = (np.array([0.0, 0.0, 0.0]), np.diag([1.0, 0.0, 0.0]))
    assert fid.frechet_distance(a, b) == pytest.approx(1.0 + 4.0 + 1.0, rel=1e-12)
    assert fid.frechet_distance((np.zeros(2), np.zeros((2, 2))), (np.ones(2), np.zeros((2, 2)))) == 2.0


def test_reference_files_adm_and_edm_layouts_load_and_wrong_keys_are_named(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    stats.save(str(tmp_path / "ours.npz"), mu, sigma)
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)  # EDM's fid.py ref: mu, sigma
    np.savez(
        tmp_path / "adm.npz",
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
        mu=mu.astype(np.float32),
        sigma=sigma,
        mu_s=mu,
        sigma_s=sigma,
    )  # ADM's reference batch: images + pool + spatial stats
    for name in ("ours", "edm", "adm"):
        loaded = stats.load(str(tmp_path / f"{name}.npz"))
        assert (
            loaded[0].dtype == np.float64
            and np.array_equal(loaded[0], mu)
            and np.array_equal(loaded[1], sigma)
        )
    np.savez(tmp_path / "bad.npz", mu=mu, cov=sigma)
    with pytest.raises(NeonError, match=r"lacks sigma \(it has: mu, cov\)"):
        stats.load(str(tmp_path / "bad.npz"))
    assert len(images.source(str(tmp_path / "adm.npz"))) == 2  # ADM's batch is an image source too


class ImageStub:
    """A stand-in image family: smooth images drawn from each sample's seed; the core's default
    (Inception) features, as it defines no `features` of its own."""

    name = "stub"

    def sample(self, model, labels, seeds, sampler):
        return torch.cat([smooth(1, int(seed)) for seed in seeds])


def test_image_sources_read_the_same_images(tmp_path):
    batch = torch.cat([smooth(5, 7), noise(2, 8)])
    conf = synthetic.SyntheticConfig(
        out=str(tmp_path / "S"), num=7, batch_size=2, shard_size=3, labels="none"
    )
    for _ in synthetic.write(ImageStub(), family.Model(net=torch.nn.Identity()), {}, conf, "sha"):
        pass
    data = synthetic.read(conf.out)
    made = data.read(range(len(data)))
    sources = [
        images.source(write_folder(tmp_path / "png", batch)),
        images.source(write_npz(tmp_path / "stored.npz", batch)),
        images.source(write_npz(tmp_path / "packed.npz", batch, "samples", compressed=True)),
    ]
    for source in sources:
        assert len(source) == 7 and source.shape == (3, 32, 32)
        assert torch.equal(source.read(range(0, 7)), batch) and torch.equal(
            source.read(range(2, 6)), batch[2:6]
        )
    from_set = images.source(conf.out)  # three shards: reads cross their boundaries
    assert len(from_set) == 7 and torch.equal(from_set.read(range(1, 7)), made[1:7])
    gray = tmp_path / "gray"
    write_folder(gray, batch[:2])
    Image.fromarray(batch[0, 0].numpy()).save(gray / "000002.png")  # mode L: converted like torch-fidelity
    assert torch.equal(images.source(str(gray)).read(range(2, 3))[0], batch[0, :1].expand(3, -1, -1))


def test_image_source_errors(tmp_path):
    def fails(path, message):
        with pytest.raises(NeonError, match=message):
            images.source(str(path))

    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    fails(tmp_path / "empty", "holds no images")
    fails(tmp_path / "missing", "no such image source")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    fails(tmp_path / "float.npz", r"holds float32 images; expected uint8")
    np.savez(tmp_path / "nchw.npz", samples=np.zeros((2, 3, 8, 8), np.uint8))
    fails(tmp_path / "nchw.npz", r"has shape \[2, 3, 8, 8\]; expected uint8 \[N,H,W,3\]")
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 8, 8, 1), np.uint8))
    fails(tmp_path / "gray.npz", "3 channels")
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    fails(tmp_path / "other.npz", r"no images under samples or arr_0 \(it has: images\)")
    os.makedirs(tmp_path / "rgba")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "rgba" / "a.png")
    fails(tmp_path / "rgba", "a RGBA image; the metrics take 8-bit RGB")
    write_folder(tmp_path / "sizes", smooth(1, 0))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "sizes" / "b.png")
    fails(tmp_path / "sizes", "b.png is 16x16, but .* is 32x32")


def test_toy_and_incomplete_synthetic_sets_are_refused(synthetic_set, tmp_path):
    with pytest.raises(NeonError, match=r"holds toy samples of shape \[2\], not images"):
        images.source(synthetic_set)
    manifest = json.load(open(os.path.join(synthetic_set, "manifest.json")))
    manifest["shards"].pop("shard-00003.npz")
    files.write_json(os.path.join(synthetic_set, "manifest.json"), manifest)
    with pytest.raises(NeonError, match=r"is incomplete \(3 of 4 shards\)"):
        images.source(synthetic_set)


@pytest.fixture
def good_ref(tmp_path):
    stats.save(str(tmp_path / "ref.npz"), np.zeros(2048), np.eye(2048))
    return str(tmp_path / "ref.npz")


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, good_ref, weights, base_ckpt, capsys):
    os.makedirs(tmp_path / "empty")
    four = write_npz(tmp_path / "four.npz", smooth(4, 0))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "rgba.npz", arr_0=np.zeros((4, 8, 8, 4), np.uint8))
    np.savez(tmp_path / "keys.npz", mean=np.zeros(2048), cov=np.eye(2048))
    stats.save(str(tmp_path / "toy.npz"), np.zeros(2), np.eye(2))
    w = ["--inception-weights", weights]
    cases = [
        (
            ["fid", "--images", four, "--ref", str(tmp_path / "keys.npz"), *w],
            "lacks mu and sigma (it has: mean, cov)",
        ),
        (["fid", "--images", four, "--ref", str(tmp_path / "toy.npz"), *w], "holds 2-d statistics"),
        (["fid", "--images", str(tmp_path / "float.npz"), "--ref", good_ref, *w], "holds float32 images"),
        (["fid", "--images", str(tmp_path / "rgba.npz"), "--ref", good_ref, *w], "has shape [4, 8, 8, 4]"),
        (
            ["fid-stats", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o.npz"), *w],
            "holds no images",
        ),
        (["fid", "--images", four, "--ref", good_ref, "--is", *w], "needs at least 10 images"),
        (["fid", "--images", four, "--ref", good_ref, "--pr", four, *w], "needs more than 5 images"),
        (
            ["fid", "--images", four, "--ref", good_ref, "--inception-weights", "nope.pth"],
            "no such Inception weights",
        ),
        (
            [
                "fid-stats",
                "--images",
                four,
                "--out",
                str(tmp_path / "o.npz"),
                "--inception-weights",
                base_ckpt,
            ],
            "is not a torch-fidelity InceptionV3 state dict",
        ),
        (
            ["fid", "--images", four, "--ref", good_ref, "--sweep.num", "3"],
            "takes only --fid.* recipe overrides",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert (
            exit_info.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err
        ), err
    assert not os.path.exists(tmp_path / "o.npz")


def test_fid_section_from_recipe_flags_and_overrides(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: toy\nfid:\n  inception_weights: from-recipe.pth\n  batch_size: 16\n")
    cli.main(
        [
            "fid",
            "--config",
            str(recipe),
            "--images",
            "x",
            "--ref",
            "r.npz",
            "--fid.batch_size",
            "8",
            "--dry-run",
        ]
    )
    assert yaml.safe_load(capsys.readouterr().out)["fid"] == {
        "inception_weights": "from-recipe.pth",
        "batch_size": 8,
    }
    cli.main(
        [
            "sweep",
            "--config",
            str(recipe),
            "--base",
            "b.pt",
            "--self",
            "r",
            "--inception-weights",
            "w.pth",
            "--dry-run",
        ]
    )
    assert "inception_weights: w.pth" in capsys.readouterr().out
    assert inception.DEFAULT_WEIGHTS.endswith(
        os.path.basename(
            __import__(
                "torch_fidelity.feature_extractor_inceptionv3"
            ).feature_extractor_inceptionv3.URL_INCEPTION_V3
        )
    )


def test_generate_and_score_an_image_family_with_inception_features(weights):
    stub, model = ImageStub(), family.Model(net=torch.nn.Identity(), image_size=32)
    # against zero statistics the FID is ‖mu‖² + Tr(Σ): a closed form to check the scoring path's number by
    reference = (np.zeros(2048), np.zeros((2048, 2048)))
    conf = inception.FidConfig(inception_weights=weights, batch_size=1)
    value = score.generate_and_score(stub, model, {}, (40, 2), 1, conf, reference)[
        "fid"
    ]  # seeds 40, 41: one per batch
    extractor = inception.shared(inception.FidConfig(inception_weights=weights))
    mu, sigma = fid.statistics(inception.forward(extractor, torch.cat([smooth(1, 40), smooth(1, 41)]))[0])
    assert value == pytest.approx(mu @ mu + np.trace(sigma), rel=1e-6)
