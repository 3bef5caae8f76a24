"""Bad inputs and faults across every verb: each exits with code 2, prints one line `error: …` and
nothing else, and leaves no file at or beside its output.

The cases run in this process (`neon.cli.main`), each in a folder of its own holding only what the
case builds; the folder's listing is compared before and after. A case is (id, argv builder,
expected text of the error); a builder gets the shared inputs `P` and the case folder `tmp`, may
write malformed inputs into `tmp`, and returns the argv.
"""

import fcntl
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

from neon import cli, synthetic
from neon.family import write_checkpoint
from neon.io import checkpoint, files
from neon.toy.family import ToySampler
from neon.toy.family import family as toy
from tests.conftest import save_base

pytestmark = pytest.mark.usefixtures("one_thread")


class Inputs:
    """The shared valid inputs (toy): base checkpoints, a synthetic set, a fine-tune run."""


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    p = Inputs()
    p.base = save_base(root / "base.pt")
    p.ar = save_base(root / "ar.pt", kind="ar")
    p.S = str(root / "S")
    conf = synthetic.SyntheticConfig(out=p.S, num=48, batch_size=16, shard_size=16, labels="none")
    for _ in synthetic.write(toy, toy.load(p.base), ToySampler(zeta=1.1), conf, files.sha256(p.base)):
        pass
    p.run = str(root / "run")
    cli.main(
        [
            "finetune",
            "--family",
            "toy",
            "--ckpt",
            p.base,
            "--data",
            p.S,
            "--out",
            p.run,
            "--images",
            "32",
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
        ]
    )
    p.snapshot = os.path.join(p.run, "snapshot-0000000032.pt")
    p.images = str(root / "images.npz")
    np.savez(p.images, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    p.ref = str(root / "ref.npz")
    np.savez(p.ref, mu=np.zeros(2), sigma=np.eye(2))
    return p


# -- builders of malformed inputs (each writes into the case folder and returns the path) --------


def copy_set(P, tmp, edit=None, manifest=None) -> str:
    """A copy of the shared synthetic set; `manifest` replaces its manifest's content (any JSON
    value, or a raw string), `edit(directory)` changes files."""
    out = os.path.join(tmp, "S")
    os.makedirs(out)
    for name in os.listdir(P.S):
        shutil.copy2(os.path.join(P.S, name), os.path.join(out, name))  # mtimes kept: the sha256 stamp holds
    if manifest is not None:
        with open(os.path.join(out, synthetic.MANIFEST)) as f:
            current = json.load(f)
        value = manifest(current) if callable(manifest) else manifest
        with open(os.path.join(out, synthetic.MANIFEST), "w") as f:
            f.write(value if isinstance(value, str) else json.dumps(value))
    if edit:
        edit(out)
    return out


def toy_ckpt(tmp, name="ckpt.pt", arch=None, weights=None, **entries) -> str:
    """A toy checkpoint with the given arch (default the diffusion preset) and weights."""
    model = toy.tiny(0)
    data = {
        "family": "toy",
        "arch": arch if arch is not None else dict(model.arch),
        "model": weights if weights is not None else model.net.state_dict(),
        **entries,
    }
    path = os.path.join(tmp, name)
    torch.save(data, path)
    return path


def edm_ckpt(tmp, name="edm.pt", **entries) -> str:
    """The tiny EDM network in its container, with `entries` replacing or adding entries."""
    from edm.family import family as edm

    model = edm.tiny(0)
    path = os.path.join(tmp, name)
    torch.save({"ema": model.net.state_dict(), "arch": model.arch, **entries}, path)
    return path


def nan_ckpt(tmp, name="nan.pt") -> str:
    model = toy.tiny(0)
    sd = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in model.net.state_dict().items()
    }
    path = os.path.join(tmp, name)
    write_checkpoint(toy, sd, path, like=model)
    return path


def write(tmp, name, data: bytes | str) -> str:
    path = os.path.join(tmp, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def npz(tmp, name, **arrays) -> str:
    path = os.path.join(tmp, name)
    np.savez(path, **arrays)
    return path


def declared_npz(tmp, name, key, shape, dtype="<f8") -> str:
    """An .npz whose member `key` declares `shape` but holds only a few bytes (a hostile header)."""
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    text = repr(header).encode() + b" "
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 64
    path = os.path.join(tmp, name)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(key + ".npy", npy)
    return path


def state_without(P, tmp, key) -> str:
    """A copy of the shared fine-tune run whose training state lacks `key`."""
    out = os.path.join(tmp, "run")
    os.makedirs(out)
    state = checkpoint.read_state(os.path.join(P.run, "state-latest.pt"))
    state.pop(key)
    torch.save(state, os.path.join(out, "state-latest.pt"))
    return out


def torn(tmp, name, text) -> str:
    return write(tmp, name, text)


SAMPLE = [
    "sample",
    "--family",
    "toy",
    "--num-images",
    "16",
    "--batch-size",
    "8",
    "--shard-size",
    "8",
    "--synthetic.labels",
    "none",
]
FINETUNE = ["finetune", "--family", "toy", "--images", "16", "--batch-size", "8"]
SWEEP = ["sweep", "--family", "toy", "--num-images", "8", "--batch-size", "8"]


def out(tmp, name="out"):
    return os.path.join(tmp, name)


CASES = [
    # the command line itself
    ("no-verb", lambda P, t: [], "required: verb"),
    ("unknown-verb", lambda P, t: ["frobnicate"], "invalid choice: 'frobnicate'"),
    (
        "bad-int",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--num-images", "many"],
        "invalid int value: 'many'",
    ),
    (
        "unknown-flag",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--bogus", "1"],
        "unrecognized argument: --bogus",
    ),
    (
        "override-no-value",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--sampler.zeta"],
        "--sampler.zeta needs a value",
    ),
    (
        "unknown-section",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--nosuch.x", "1"],
        "unknown recipe section",
    ),
    (
        "config-missing",
        lambda P, t: ["sample", "--config", out(t, "r.yaml"), "--out", out(t)],
        "no such config file",
    ),
    (
        "config-bad-yaml",
        lambda P, t: ["sample", "--config", write(t, "r.yaml", "family: [toy"), "--out", out(t)],
        "cannot parse",
    ),
    (
        "config-a-list",
        lambda P, t: ["sample", "--config", write(t, "r.yaml", "- toy\n"), "--out", out(t)],
        "a recipe is a mapping",
    ),
    (
        "config-unknown-section",
        lambda P, t: ["sample", "--config", write(t, "r.yaml", "family: toy\nmodels: {}\n"), "--out", out(t)],
        "unknown recipe section 'models'",
    ),
    (
        "config-section-scalar",
        lambda P, t: ["sample", "--config", write(t, "r.yaml", "family: toy\nsampler: 3\n"), "--out", out(t)],
        "sampler: expected a mapping",
    ),
    # sample
    (
        "unknown-family",
        lambda P, t: ["sample", "--family", "nope", "--ckpt", P.base, "--out", out(t)],
        "unknown family 'nope'",
    ),
    (
        "family-bad-module",
        lambda P, t: ["sample", "--family", "no.such.module:family", "--ckpt", P.base, "--out", out(t)],
        "cannot load family",
    ),
    (
        "ckpt-missing",
        lambda P, t: [*SAMPLE, "--ckpt", out(t, "none.pt"), "--out", out(t)],
        "no such checkpoint",
    ),
    (
        "ckpt-garbage",
        lambda P, t: [*SAMPLE, "--ckpt", write(t, "g.pt", b"garbage"), "--out", out(t)],
        "cannot read checkpoint",
    ),
    ("ckpt-a-folder", lambda P, t: [*SAMPLE, "--ckpt", t, "--out", out(t)], "is a directory"),
    (
        "ckpt-arch-extra-kwarg",
        lambda P, t: [*SAMPLE, "--ckpt", toy_ckpt(t, arch={**toy.tiny(0).arch, "bogus": 1}), "--out", out(t)],
        "unknown arch key 'bogus'",
    ),
    (
        "ckpt-arch-bad-type",
        lambda P, t: [
            *SAMPLE,
            "--ckpt",
            toy_ckpt(t, arch={**toy.tiny(0).arch, "hidden": "big"}),
            "--out",
            out(t),
        ],
        "arch",
    ),
    (
        "ckpt-arch-huge",
        lambda P, t: [
            *SAMPLE,
            "--ckpt",
            toy_ckpt(t, arch={**toy.tiny(0).arch, "hidden": 10_000_000}),
            "--out",
            out(t),
        ],
        "limit",
    ),
    (
        "ckpt-arch-not-a-dict",
        lambda P, t: [*SAMPLE, "--ckpt", toy_ckpt(t, arch=["diffusion"]), "--out", out(t)],
        "arch",
    ),
    (
        "ckpt-weights-mismatch",
        lambda P, t: [
            *SAMPLE,
            "--ckpt",
            toy_ckpt(t, weights=toy.tiny(0, "ar").net.state_dict()),
            "--out",
            out(t),
        ],
        "does not fit",
    ),
    (
        "ckpt-pickle-os-system",
        lambda P, t: [
            *SAMPLE,
            "--ckpt",
            write(t, "evil.pkl", b"cos\nsystem\n(S'touch pwned'\ntR."),
            "--out",
            out(t),
        ],
        "refused",
    ),
    (
        "ckpt-edm-augment-pipe-not-a-mapping",
        lambda P, t: [
            "sample",
            "--family",
            "edm",
            "--ckpt",
            edm_ckpt(t, augment_pipe=0.12),
            "--out",
            out(t),
            "--num-images",
            "4",
        ],
        "augment_pipe must be AugmentPipe's arguments or None, got float",
    ),
    (
        "sampler-nan",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--sampler.zeta", "nan"],
        "sampler.zeta: must be finite",
    ),
    (
        "sampler-inf",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--sampler.zeta", "inf"],
        "sampler.zeta: must be finite",
    ),
    (
        "sampler-unknown-key",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--sampler.nope", "1"],
        "unknown key sampler.nope",
    ),
    (
        "num-negative",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--num-images", "-5"],
        "synthetic.num must be >= 0",
    ),
    (
        "shard-size-zero",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--shard-size", "0"],
        "shard_size",
    ),
    (
        "out-is-a-file",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", write(t, "out", "x")],
        "not a directory",
    ),
    (
        "out-below-a-file",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", os.path.join(write(t, "f", "x"), "sub")],
        "not a directory",
    ),
    ("out-unwritable", lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", "/proc/neon-out"], "/proc/neon-out"),
    (
        "out-holds-other-set",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", copy_set(P, t)],
        "holds a synthetic set",
    ),
    ("base-nan-samples", lambda P, t: [*SAMPLE, "--ckpt", nan_ckpt(t), "--out", out(t)], "non-finite"),
    ("out-locked", lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", locked(t)], "in use by"),
    # finetune
    (
        "data-missing",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", out(t, "none"), "--out", out(t)],
        "not a synthetic set",
    ),
    (
        "data-empty-folder",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", folder(t), "--out", out(t)],
        "not a synthetic set",
    ),
    (
        "manifest-a-list",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", copy_set(P, t, manifest=[]), "--out", out(t)],
        "manifest",
    ),
    (
        "manifest-null",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--data",
            copy_set(P, t, manifest="null"),
            "--out",
            out(t),
        ],
        "manifest",
    ),
    (
        "manifest-no-num",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, manifest=lambda m: {k: v for k, v in m.items() if k != "num"}),
        ],
        "num",
    ),
    (
        "manifest-shard-size-0",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, manifest=lambda m: {**m, "shard_size": 0}),
        ],
        "shard_size",
    ),
    (
        "manifest-shards-not-a-map",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, manifest=lambda m: {**m, "shards": ["a"]}),
        ],
        "shards",
    ),
    (
        "manifest-torn",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--data",
            copy_set(P, t, manifest='{"num": 4'),
            "--out",
            out(t),
        ],
        "corrupt",
    ),
    (
        "shard-deleted",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, edit=lambda d: os.remove(os.path.join(d, "shard-00001.npz"))),
        ],
        "shard-00001.npz is missing",
    ),
    (
        "shard-tampered",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, edit=lambda d: tamper(os.path.join(d, "shard-00000.npz"))),
        ],
        "does not match the sha256",
    ),
    (
        "set-incomplete",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, manifest=lambda m: {**m, "shards": dict(list(m["shards"].items())[:1])}),
        ],
        "incomplete",
    ),
    (
        "set-empty",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, manifest=lambda m: {**m, "num": 0, "shards": {}}),
        ],
        "empty",
    ),
    (
        "lr-nan",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", P.S, "--out", out(t), "--lr", "nan"],
        "finetune.lr: must be finite",
    ),
    (
        "lr-negative",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", P.S, "--out", out(t), "--lr", "-1"],
        "lr",
    ),
    (
        "ema-beta-above-1",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", P.S, "--out", out(t), "--ema-beta", "1.5"],
        "ema_beta",
    ),
    (
        "precision-unknown",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", P.S, "--out", out(t), "--precision", "fp8"],
        "precision",
    ),
    (
        "finetune-out-a-file",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", P.S, "--out", write(t, "out", "x")],
        "not a directory",
    ),
    (
        "state-missing-key",
        lambda P, t: [*FINETUNE, "--ckpt", P.base, "--data", P.S, "--out", state_without(P, t, "optimizer")],
        "state-latest.pt",
    ),
    (
        "state-garbage",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--data",
            P.S,
            "--out",
            os.path.dirname(write(t, "run/state-latest.pt", b"junk")),
        ],
        "cannot read state file",
    ),
    (
        "finetune-family-of-data-differs",
        lambda P, t: [
            *FINETUNE,
            "--ckpt",
            P.base,
            "--out",
            out(t),
            "--data",
            copy_set(P, t, manifest=lambda m: {**m, "family": "edm"}),
        ],
        "family",
    ),
    # merge
    (
        "merge-w-nan",
        lambda P, t: ["merge", "--base", P.base, "--self", P.snapshot, "--w", "nan", "--out", out(t, "m.pt")],
        "w must be finite",
    ),
    (
        "merge-w-overflow",
        lambda P, t: [
            "merge",
            "--base",
            P.base,
            "--self",
            P.snapshot,
            "--w",
            "1e39",
            "--out",
            out(t, "m.pt"),
        ],
        "float32",
    ),
    (
        "merge-self-nan",
        lambda P, t: ["merge", "--base", P.base, "--self", nan_ckpt(t), "--w", "1", "--out", out(t, "m.pt")],
        "non-finite",
    ),
    (
        "merge-mismatch",
        lambda P, t: ["merge", "--base", P.base, "--self", P.ar, "--w", "1", "--out", out(t, "m.pt")],
        "missing from self-trained",
    ),
    (
        "merge-out-is-base",
        lambda P, t: [
            "merge",
            "--base",
            copy_file(P.base, t),
            "--self",
            P.snapshot,
            "--w",
            "1",
            "--out",
            os.path.join(t, "base.pt"),
        ],
        "must not overwrite an input",
    ),
    (
        "merge-out-a-folder",
        lambda P, t: [
            "merge",
            "--base",
            P.base,
            "--self",
            P.snapshot,
            "--w",
            "1",
            "--out",
            folder(t, "o.pt"),
        ],
        "is a directory",
    ),
    (
        "merge-out-below-a-file",
        lambda P, t: [
            "merge",
            "--base",
            P.base,
            "--self",
            P.snapshot,
            "--w",
            "1",
            "--out",
            os.path.join(write(t, "f", "x"), "m.pt"),
        ],
        "not a directory",
    ),
    (
        "merge-format-unknown",
        lambda P, t: [
            "merge",
            "--base",
            P.base,
            "--self",
            P.snapshot,
            "--w",
            "1",
            "--out",
            out(t, "m.pt"),
            "--format",
            "zip",
        ],
        "invalid choice",
    ),
    (
        "merge-suffix",
        lambda P, t: ["merge", "--base", P.base, "--self", P.snapshot, "--w", "1", "--out", out(t, "m.npz")],
        "m.npz",
    ),
    (
        "merge-no-w",
        lambda P, t: ["merge", "--base", P.base, "--self", P.snapshot, "--out", out(t, "m.pt")],
        "missing --w",
    ),
    (
        "merge-self-missing",
        lambda P, t: [
            "merge",
            "--base",
            P.base,
            "--self",
            out(t, "x.pt"),
            "--w",
            "1",
            "--out",
            out(t, "m.pt"),
        ],
        "no such checkpoint",
    ),
    (
        "merge-pickle-unknown-global",
        lambda P, t: [
            "merge",
            "--base",
            write(t, "evil.pkl", b"cbuiltins\neval\n(S'1'\ntR."),
            "--self",
            P.snapshot,
            "--w",
            "1",
            "--out",
            out(t, "m.pt"),
        ],
        "refused",
    ),
    # sweep
    (
        "grid-too-fine",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--w", "0:1:1e-12", "--out", out(t)],
        "points",
    ),
    (
        "grid-w-huge",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--w", "1e39", "--out", out(t)],
        "w",
    ),
    (
        "grid-reversed",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--w", "1:0:1", "--out", out(t)],
        "bad w grid",
    ),
    (
        "grid-text",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--w", "a,b", "--out", out(t)],
        "bad w grid",
    ),
    (
        "no-snapshots",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", folder(t, "empty"), "--out", out(t)],
        "no snapshots",
    ),
    (
        "no-snapshots-no-out",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", os.path.join(t, "nothing-*.pt")],
        "no snapshots",
    ),
    (
        "ref-missing",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--ref", out(t, "r.npz"), "--out", out(t)],
        "no such reference",
    ),
    (
        "ref-nan-mu",
        lambda P, t: [
            *SWEEP,
            "--base",
            P.base,
            "--self",
            P.run,
            "--out",
            out(t),
            "--ref",
            npz(t, "r.npz", mu=np.array([np.nan, 0.0]), sigma=np.eye(2)),
        ],
        "non-finite",
    ),
    (
        "ref-shapes",
        lambda P, t: [
            *SWEEP,
            "--base",
            P.base,
            "--self",
            P.run,
            "--out",
            out(t),
            "--ref",
            npz(t, "r.npz", mu=np.zeros(2), sigma=np.eye(3)),
        ],
        "expected [D] and [D, D]",
    ),
    (
        "ref-declares-huge-sigma",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--out", out(t), "--ref", huge_ref(t)],
        "limit",
    ),
    (
        "ref-dimension-differs",
        lambda P, t: [
            *SWEEP,
            "--base",
            P.base,
            "--self",
            P.run,
            "--out",
            out(t),
            "--ref",
            npz(t, "r.npz", mu=np.zeros(3), sigma=np.eye(3)),
        ],
        "dimension",
    ),
    (
        "cfg-on-toy",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--cfg", "1.5", "--out", out(t)],
        "no guidance scale",
    ),
    (
        "sweep-batch-zero",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--batch-size", "0", "--out", out(t)],
        "batch_size",
    ),
    (
        "final-seeds-overlap",
        lambda P, t: [
            *SWEEP,
            "--base",
            P.base,
            "--self",
            P.run,
            "--final-num",
            "8",
            "--sweep.final_seed_base",
            "1000000",
            "--out",
            out(t),
        ],
        "overlap",
    ),
    (
        "sweep-out-a-file",
        lambda P, t: [*SWEEP, "--base", P.base, "--self", P.run, "--out", write(t, "out", "x")],
        "not a directory",
    ),
    (
        "sweep-sampler-nan",
        lambda P, t: [
            *SWEEP,
            "--base",
            P.base,
            "--self",
            P.run,
            "--out",
            out(t),
            "--sweep.sampler",
            "{zeta: .nan}",
        ],
        "finite",
    ),
    # fid-stats and fid
    ("stats-out-no-npz", lambda P, t: ["fid-stats", "--images", P.images, "--out", out(t, "stats")], ".npz"),
    (
        "stats-out-a-folder",
        lambda P, t: ["fid-stats", "--images", P.images, "--out", folder(t, "s.npz")],
        "is a directory",
    ),
    (
        "stats-images-missing",
        lambda P, t: ["fid-stats", "--images", out(t, "none"), "--out", out(t, "s.npz")],
        "no such image source",
    ),
    (
        "stats-images-float",
        lambda P, t: [
            "fid-stats",
            "--images",
            npz(t, "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32)),
            "--out",
            out(t, "s.npz"),
        ],
        "uint8",
    ),
    (
        "stats-images-no-key",
        lambda P, t: ["fid-stats", "--images", npz(t, "f.npz", other=np.zeros(3)), "--out", out(t, "s.npz")],
        "has no images",
    ),
    (
        "stats-images-declare-huge",
        lambda P, t: [
            "fid-stats",
            "--out",
            out(t, "s.npz"),
            "--images",
            declared_npz(t, "h.npz", "arr_0", (10**6, 1024, 1024, 3), "|u1"),
        ],
        "truncated",
    ),
    (
        "stats-empty-folder",
        lambda P, t: ["fid-stats", "--images", folder(t, "imgs"), "--out", out(t, "s.npz")],
        "holds no images",
    ),
    (
        "stats-bad-png",
        lambda P, t: [
            "fid-stats",
            "--images",
            os.path.dirname(write(t, "imgs/a.png", b"not a png")),
            "--out",
            out(t, "s.npz"),
        ],
        "cannot read image",
    ),
    (
        "fid-ref-missing",
        lambda P, t: ["fid", "--images", P.images, "--ref", out(t, "r.npz")],
        "no such reference",
    ),
    (
        "fid-ref-nan",
        lambda P, t: [
            "fid",
            "--images",
            P.images,
            "--ref",
            npz(t, "r.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048)),
        ],
        "non-finite",
    ),
    (
        "fid-tampered-set",
        lambda P, t: [
            "fid",
            "--images",
            copy_set(P, t, edit=lambda d: tamper(os.path.join(d, "shard-00002.npz"))),
            "--ref",
            P.ref,
        ],
        "does not match the sha256",
    ),
    (
        "fid-pr-missing",
        lambda P, t: ["fid", "--images", P.images, "--ref", P.ref, "--precision-recall", out(t, "none")],
        "no such image source",
    ),
    # diagnose
    (
        "diagnose-real-negative",
        lambda P, t: [
            "diagnose",
            "--family",
            "toy",
            "--ckpt",
            P.base,
            "--real",
            "toy:-5",
            "--synthetic",
            P.S,
        ],
        "toy:N",
    ),
    (
        "diagnose-real-text",
        lambda P, t: [
            "diagnose",
            "--family",
            "toy",
            "--ckpt",
            P.base,
            "--real",
            "toy:abc",
            "--synthetic",
            P.S,
        ],
        "toy:N",
    ),
    (
        "diagnose-synthetic-missing",
        lambda P, t: [
            "diagnose",
            "--family",
            "toy",
            "--ckpt",
            P.base,
            "--real",
            "toy:64",
            "--synthetic",
            out(t, "none"),
        ],
        "not a synthetic set",
    ),
    (
        "diagnose-batches-zero",
        lambda P, t: [
            "diagnose",
            "--family",
            "toy",
            "--ckpt",
            P.base,
            "--real",
            "toy:64",
            "--synthetic",
            P.S,
            "--batches",
            "0",
        ],
        "batches",
    ),
    # the last probe failures (issue 25): limits before allocation, tensor kinds, the sweep's early check
    (
        "sample-num-huge",
        lambda P, t: [*SAMPLE, "--ckpt", P.base, "--out", out(t), "--num-images", str(10**15)],
        "synthetic.num must be at most 100,000,000",
    ),
    (
        "sweep-num-huge",
        lambda P, t: [
            *SWEEP,
            "--base",
            P.base,
            "--self",
            P.run,
            "--out",
            out(t),
            "--num-images",
            str(10**15),
        ],
        "sweep.num and sweep.final_num must be at most",
    ),
    (
        "merge-self-int-where-float",
        lambda P, t: [
            "merge",
            "--base",
            P.base,
            "--self",
            retyped(t, torch.int64),
            "--w",
            "1",
            "--out",
            out(t, "m.pt"),
        ],
        "is int64 where the base's is float32",
    ),
    (
        "merge-self-float-where-int",
        lambda P, t: [
            "merge",
            "--base",
            retyped(t, torch.int64),
            "--self",
            P.base,
            "--w",
            "1",
            "--out",
            out(t, "m.pt"),
        ],
        "is float32 where the base's is int64",
    ),
    (
        "sweep-self-nan-before-any-score",
        lambda P, t: [
            *SWEEP,
            "--base",
            P.base,
            "--self",
            os.path.dirname(nan_ckpt(folder(t, "run"), "snapshot-0000000016.pt")),
            "--out",
            out(t),
        ],
        "holds non-finite values",
    ),
    # report
    ("report-no-sweep", lambda P, t: ["report", folder(t)], "holds no config.resolved.yaml"),
    (
        "report-snapshots-gone",
        lambda P, t: [
            "report",
            os.path.dirname(
                write(
                    t, "sw/config.resolved.yaml", f"family: toy\nsweep:\n  self_trained: {out(t, 'gone')}\n"
                )
            ),
        ],
        "no snapshots match sweep.self_trained",
    ),
    # demo
    ("demo-out-a-file", lambda P, t: ["demo", "--quick", "--out", write(t, "out", "x")], "not a directory"),
    ("demo-overrides", lambda P, t: ["demo", "--sampler.zeta", "1"], "takes no recipe overrides"),
]


def retyped(tmp, dtype) -> str:
    """A toy checkpoint whose first tensor has `dtype` (the values kept)."""
    weights = toy.tiny(0).net.state_dict()
    first = next(iter(weights))
    return toy_ckpt(tmp, "retyped.pt", weights={**weights, first: weights[first].to(dtype)})


def folder(tmp, name="d") -> str:
    path = os.path.join(tmp, name)
    os.makedirs(path)
    return path


def copy_file(path, tmp) -> str:
    target = os.path.join(tmp, os.path.basename(path))
    with open(path, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
    return target


def tamper(path) -> None:
    with open(path, "r+b") as f:
        f.seek(-9, os.SEEK_END)
        byte = f.read(1)
        f.seek(-9, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def huge_ref(tmp) -> str:
    path = declared_npz(tmp, "r.npz", "sigma", (200_000, 200_000))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("mu.npy", _npy(np.zeros(200_000)))
    return path


def _npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


_HELD = []


def locked(tmp) -> str:
    """An output folder another writer holds (the lock taken here, in another open file)."""
    path = os.path.join(tmp, "out")
    os.makedirs(path)
    f = open(os.path.join(path, files.LOCK), "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(json.dumps({"pid": 999999, "host": "elsewhere", "command": "neon sample"}))
    f.flush()
    _HELD.append(f)
    return path


def test_the_suite_covers_enough_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(P, tmp_path, monkeypatch, capsys, build, message):
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)  # a default output folder would appear here
    argv = [str(a) for a in build(P, str(case))]
    before = _listing(case)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
    finally:
        for f in _HELD:
            f.close()
        _HELD.clear()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert _listing(case) == before, f"left behind: {sorted(set(_listing(case)) - set(before))}"
    assert not os.path.exists(case / "pwned")


def _listing(root) -> dict:
    """Every file below `root` with its size and mtime (a changed file counts too)."""
    found = {}
    for directory, folders, names in os.walk(root):
        for name in names + folders:
            path = os.path.join(directory, name)
            info = os.stat(path)
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns) if name in names else None
    return found
