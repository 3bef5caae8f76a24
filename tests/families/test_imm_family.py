"""The IMM adapter: the Neon loop through the CLI on a tiny IMM (tiny DiT + tiny AutoencoderKL in a
diffusers folder), world-size independence of its synthetic set, IMM network pickles read as data
and malicious ones refused, the loss and sampler contracts, and imm/calculate_fid.py."""

import copy
import enum
import json
import os
import pickle
import sys
import types

import pytest
import torch

from imm import calculate_fid as imm_fid
from imm import networks
from imm.family import LOSS, TINY, _TargetInFloat32, family
from imm.loss import IMMLoss
from imm.sampler import generators, initial_latents, pushforward_generator_fn
from neon import cli
from neon import family as registry
from neon.errors import NeonError
from neon.family import write_checkpoint
from neon.io import safetensors
from tests.dist.test_world_size import TORCHRUN, _shards, _torchrun

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]

MARKER = "pickle-code-ran"


def _tiny_files(tmp_path, seed=0):
    """A tiny IMM saved as our .pt container, and its AutoencoderKL as a diffusers folder."""
    model = family.tiny(seed)
    base = str(tmp_path / "imm-base.pt")
    write_checkpoint(family, model.net.state_dict(), base, like=model)
    vae = str(tmp_path / "vae")
    if not os.path.isdir(vae):
        model.codec.save_pretrained(vae)
    return model, base, ["--model.codec", vae]


def test_neon_loop_through_the_cli(tmp_path, capsys, inception_file):
    _, base, codec = _tiny_files(tmp_path)
    common = ["--family", "imm", *codec]
    S, run = str(tmp_path / "S"), str(tmp_path / "run")
    cli.main(["sample", *common, "--ckpt", base, "--out", S, "--num", "8", "--batch-size", "8"])
    cli.main(
        [
            "finetune",
            *common,
            "--ckpt",
            base,
            "--data",
            S,
            "--out",
            run,
            "--images",
            "8",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
        ]
    )
    snapshot = os.path.join(run, "snapshot-0000000008.pt")
    merged = str(tmp_path / "neon.pt")
    cli.main(["merge", "--base", base, "--self", snapshot, "--w", "0.5", "--out", merged])
    base_sd, self_sd = (registry.read_checkpoint(family, p).weights for p in (base, snapshot))
    merged_sd = registry.read_checkpoint(family, merged).weights
    changed = [k for k, v in base_sd.items() if not torch.equal(self_sd[k], v)]
    assert changed and all(torch.equal(merged_sd[k], 1.5 * base_sd[k] - 0.5 * self_sd[k]) for k in changed)
    ref = str(tmp_path / "ref.npz")
    fid_flags = ["--inception-weights", inception_file, "--batch-size", "8"]
    cli.main(["fid-stats", "--images", S, "--out", ref, *fid_flags])
    sweep_dir = str(tmp_path / "sweep")
    # one guidance scale only: each point costs a 2048-d Fréchet distance (seconds on one thread)
    cli.main(
        [
            "sweep",
            *common,
            "--base",
            base,
            "--self",
            run,
            "--w",
            "1",
            "--sweep.cfg",
            "[3]",
            "--num",
            "2",
            "--ref",
            ref,
            "--out",
            sweep_dir,
            *fid_flags,
        ]
    )
    records = [json.loads(line) for line in open(os.path.join(sweep_dir, "results.jsonl"))]
    assert {(r["snapshot"], r["w"], r["cfg"]) for r in records} == {("base", 0.0, 3.0), (snapshot, 1.0, 3.0)}
    assert all(r["fid"] > 0 for r in records)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_processes_write_the_same_synthetic_set(tmp_path):
    _, base, codec = _tiny_files(tmp_path)
    args = [
        "sample",
        "--family",
        "imm",
        *codec,
        "--ckpt",
        base,
        "--synthetic.num",
        "12",
        "--batch-size",
        "3",
        "--shard-size",
        "3",
        "--sampler.num_steps",
        "2",
    ]
    cli.main(args + ["--out", str(tmp_path / "one")])
    _torchrun(*args, "--out", tmp_path / "two")
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two") and len(_shards(tmp_path / "one")) == 4


# --- IMM network pickles -----------------------------------------------------------------------

_TIMM = {
    "PatchEmbed": "timm.layers.patch_embed",
    "Attention": "timm.models.vision_transformer",
    "Mlp": "timm.layers.mlp",
}


def _stub_modules(monkeypatch):
    """Importable stand-ins for torch_utils.persistence and the timm modules an IMM pickle names (so
    that pickle can write their globals); returns (_reconstruct_persistent_obj, timm classes, Format)."""

    def module(name):
        mod = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    for name in ("torch_utils", "timm", "timm.layers", "timm.models"):
        module(name)
    persistence = module("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # only its name is pickled
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    classes = {}
    for name, where in _TIMM.items():
        classes[name] = type(name, (), {"__module__": where})
        setattr(module(where), name, classes[name])
    fmt = enum.Enum(
        "Format", {"NCHW": "NCHW", "NHWC": "NHWC"}, type=str, module="timm.layers.format", qualname="Format"
    )
    module("timm.layers.format").Format = fmt
    return _reconstruct_persistent_obj, classes, fmt


def _upstream_layout(net, classes, fmt):
    """A copy of `net` whose PatchEmbed/Attention/Mlp are plain objects of the timm stand-in classes,
    with the extra members timm's carry (Format, GELU, Dropout and Identity layers)."""
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in list(parent._modules.items()):
            kind = type(child).__name__
            if type(child).__module__ != networks.__name__ or kind not in classes:
                continue
            state = dict(child.__dict__)
            children = dict(state["_modules"])
            if kind == "PatchEmbed":
                state["output_fmt"], state["flatten"] = fmt.NCHW, True
                children["norm"] = torch.nn.Identity()
            elif kind == "Attention":
                order = ["qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"]
                children = {k: children.get(k, torch.nn.Dropout(0.0)) for k in order}
                state["fused_attn"] = True
            else:
                children = {
                    "fc1": children["fc1"],
                    "act": torch.nn.GELU(approximate="tanh"),
                    "drop1": torch.nn.Dropout(0.0),
                    "norm": torch.nn.Identity(),
                    "fc2": children["fc2"],
                    "drop2": torch.nn.Dropout(0.0),
                }
            state["_modules"] = children
            stand_in = object.__new__(classes[kind])
            stand_in.__dict__.update(state)
            parent._modules[name] = stand_in
    return net


def _write_imm_pickle(path, model, monkeypatch, marker_dir, init_kwargs=None):
    """Write `model` as the authors' training loop does: {'ema', 'augment_pipe', 'dataset_kwargs'},
    every IMM module as torch_utils.persistence._reconstruct_persistent_obj(meta) with module source
    that would create a marker file if anyone executed it, timm and torch layers by class name."""
    reconstruct, classes, fmt = _stub_modules(monkeypatch)
    source = f"open({os.path.join(str(marker_dir), MARKER)!r}, 'w').write('ran')\n"
    top = _upstream_layout(model.net, classes, fmt)
    kwargs = init_kwargs or {k: v for k, v in model.arch.items() if k != "class_name"}

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.nn.Module) and type(obj).__module__ == networks.__name__:
                state = {**obj.__dict__, "_init_args": (), "_init_kwargs": dict(kwargs) if obj is top else {}}
                meta = {
                    "type": "class",
                    "version": 6,
                    "module_src": source,
                    "class_name": type(obj).__name__,
                    "state": state,
                }
                return reconstruct, (meta,)
            return NotImplemented

    dataset = {"class_name": "training.dataset.ImageFolderDataset", "path": "ns30k.zip", "use_labels": True}
    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump({"ema": top, "augment_pipe": None, "dataset_kwargs": dataset})
    for name in [n for n in sys.modules if n == "timm" or n.startswith(("timm.", "torch_utils"))]:
        monkeypatch.delitem(sys.modules, name)  # the reader must not need them


def test_imm_pickle_loads_as_data_without_running_its_code(tmp_path, monkeypatch):
    model, _, codec = _tiny_files(tmp_path)
    path = tmp_path / "imm-tiny.pkl"
    recorded = {
        **{k: v for k, v in TINY.items() if k != "class_name"},
        "mixed_precision": "fp16",
    }  # as in im256.yaml
    _write_imm_pickle(path, model, monkeypatch, tmp_path, recorded)
    container = registry.read_checkpoint(family, str(path))
    assert container.weights_key == ("ema",) and container.data["dataset_kwargs"]["use_labels"] is True
    assert container.data["arch"] == {**recorded, "class_name": "IMMPrecond"}
    expected = model.net.state_dict()
    assert list(container.weights) == list(expected)
    assert all(torch.equal(container.weights[k], v) for k, v in expected.items())
    loaded = family.load(str(path), None, "cpu", codec=codec[1])
    assert loaded.arch == TINY  # built in float32 whatever the file records
    labels, seeds = torch.tensor([3, -1, 7, 3]), torch.tensor([0, 1, 2, 3])
    assert torch.equal(
        family.sample(loaded, labels, seeds, family.Sampler(num_steps=2)),
        family.sample(model, labels, seeds, family.Sampler(num_steps=2)),
    )
    assert registry.detect(str(path)) is family  # EDM's allowlist refuses the timm layers
    assert not (tmp_path / MARKER).exists()


class _Call:
    """An object that pickles as a call of `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _persistent(reconstruct, meta):
    return _Call(reconstruct, meta)


@pytest.mark.parametrize("kind", ["os.system", "unknown global", "source meant to run", "not a class record"])
def test_malicious_imm_pickles_are_refused_and_nothing_runs(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = f"open({MARKER!r}, 'w').write('ran')"
    reconstruct, _, _ = _stub_modules(monkeypatch)
    record = {"type": "class", "version": 6, "module_src": source, "class_name": "IMMPrecond", "state": {}}
    payload, message = {
        "os.system": ({"ema": _Call(os.system, f"touch {MARKER}")}, "refused posix.system"),
        "unknown global": ({"ema": _Call(eval, source)}, "refused builtins.eval"),
        "source meant to run": (
            {"ema": _persistent(reconstruct, record), "x": _Call(exec, source)},
            "refused builtins.exec",
        ),
        "not a class record": (
            {"ema": _persistent(reconstruct, {**record, "type": "function"})},
            "malformed persistent object record",
        ),
    }[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(NeonError, match=message) as error:
        registry.read_checkpoint(family, str(path))
    assert "\n" not in str(error.value)
    assert not (tmp_path / MARKER).exists()


# --- loss and sampler contracts ----------------------------------------------------------------


def test_loss_encodes_then_draws_from_the_generator_and_wants_groups_of_four():
    model = family.tiny(0)
    images = torch.randint(
        0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    labels = torch.tensor([0, 1, 2, 3, -1, 5, 6, 7])
    model.net.train()
    loss = family.loss(model, images, labels, torch.Generator().manual_seed(4))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # by hand: the posterior sample first, then IMMLoss's draws, all from one generator
    g = torch.Generator().manual_seed(4)
    encoder = family._encoder(model)
    latents = encoder.encode_latents(encoder.encode_pixels(images), generator=g)
    one_hot = torch.zeros(8, 10)
    one_hot[[0, 1, 2, 3, 5, 6, 7], [0, 1, 2, 3, 5, 6, 7]] = 1
    assert torch.equal(loss, IMMLoss(**LOSS)(model.net, latents, one_hot, generator=g).mean())
    with pytest.raises(NeonError, match="multiple of 4, got 6"):
        family.loss(model, images[:6], labels[:6], torch.Generator())
    with pytest.raises(NeonError, match=r"class labels must be in \[0, 10\)"):
        family.loss(model, images[:4], torch.tensor([0, 1, 2, 10]), torch.Generator())


def test_the_target_branch_runs_without_the_fine_tune_s_autocast():
    net = family.tiny(0).net
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    t, s = torch.full((4, 1, 1, 1), 0.7), torch.full((4, 1, 1, 1), 0.3)
    labels = torch.eye(10)[:4]
    with torch.no_grad():
        full = net(x, t, s, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            target = _TargetInFloat32(net)(x, t, s, labels, force_fp32=True)
            student = _TargetInFloat32(net)(x, t, s, labels)
    assert torch.equal(target, full) and not torch.equal(student, full)


def test_sample_is_the_float32_pushforward_of_per_seed_latents_decoded():
    model = family.tiny(0)
    labels, seeds = torch.tensor([2, -1, 9]), torch.tensor([5, 6, 7])
    ours = family.sample(model, labels, seeds, family.Sampler(num_steps=4, cfg=1.8))
    with torch.no_grad():
        latents = initial_latents(generators([5, 6, 7]), (4, 8, 8), 0.5)
        one_hot = torch.zeros(3, 10)
        one_hot[[0, 2], [2, 9]] = 1
        x = pushforward_generator_fn(model.net, latents, one_hot, num_steps=4, cfg_scale=1.8)
    assert ours.shape == (3, 3, 16, 16) and torch.equal(ours, family._encoder(model).decode(x))
    plain = family.sample(model, labels, seeds, family.Sampler(num_steps=4, cfg=None))
    assert torch.equal(plain, family.sample(model, labels, seeds, family.Sampler(num_steps=4, cfg=1.0)))
    assert not torch.equal(plain, ours)


def test_pth_spelling_and_a_codec_weights_file_load(tmp_path):
    model = family.tiny(2)
    path = str(tmp_path / "imm.pth")
    write_checkpoint(family, model.net.state_dict(), path, like=model)
    codec = str(tmp_path / "vae.safetensors")
    safetensors.write(
        codec,
        [(k, v.dtype, v.shape) for k, v in model.codec.state_dict().items()],
        model.codec.state_dict().values(),
    )
    loaded = family.load(path, None, "cpu", codec=codec)
    assert loaded.extras == model.extras and loaded.image_size == 16
    with pytest.raises(NeonError, match="no VAE at"):
        family.load(path, None, "cpu", codec=str(tmp_path / "missing"))


# --- calculate_fid -----------------------------------------------------------------------------


def test_imm_calculate_fid(tmp_path, capsys, inception_file):
    _, base, codec = _tiny_files(tmp_path)
    S = str(tmp_path / "S")
    cli.main(
        [
            "sample",
            "--family",
            "imm",
            *codec,
            "--ckpt",
            base,
            "--out",
            S,
            "--num",
            "4",
            "--batch-size",
            "4",
            "--sampler.num_steps",
            "4",
            "--sampler.cfg",
            "1.8",
        ]
    )
    ref = str(tmp_path / "ref.npz")
    cli.main(["fid-stats", "--images", S, "--out", ref, "--inception-weights", inception_file])
    capsys.readouterr()
    imm_fid.main(
        [
            "--model_ckpt",
            base,
            "--vae",
            codec[1],
            "--num_images",
            "4",
            "--batch_size",
            "4",
            "--img_size",
            "16",
            "--steps",
            "4",
            "--fid_stats",
            ref,
            "--seed",
            "0",
            "--inception_weights",
            inception_file,
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same seeds, labels, batches and sampler as the synthetic set: the FID of the set against itself
    assert result["num_images"] == 4 and result["cfg"] == 1.8 and abs(result["fid"]) < 1e-6
    with pytest.raises(SystemExit) as exit_info:
        imm_fid.main(["--model_ckpt", base, "--vae", codec[1], "--img_size", "256", "--fid_stats", ref])
    assert exit_info.value.code == 2 and "makes 16 px images" in capsys.readouterr().err
