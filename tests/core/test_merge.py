"""neon.merge: the extrapolation (hand-computed values per dtype), what is copied from the base,
refusals that leave no output, container round trips, and peak memory of a streamed merge."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch

from neon.errors import NeonError
from neon.io import checkpoint, safetensors
from neon.merge import extrapolate, merge_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_extrapolate_hand_computed(dtype):
    base = {"x": torch.tensor([1.0, 2.0], dtype=dtype), "y": torch.tensor([[1.0, -3.0, 0.25]], dtype=dtype)}
    self_trained = {
        "x": torch.tensor([0.5, 3.0], dtype=dtype),
        "y": torch.tensor([[0.5, -1.0, 1.0]], dtype=dtype),
    }
    merged = extrapolate(base, self_trained, 0.5)
    assert merged["x"].dtype == dtype and merged["x"].tolist() == [1.25, 1.5]  # 1.5·a − 0.5·b
    merged = extrapolate(base, self_trained, 2)
    assert merged["y"].dtype == dtype and merged["y"].tolist() == [[2.0, -7.0, -1.25]]  # 3·a − 2·b
    assert base["x"].tolist() == [1.0, 2.0] and self_trained["x"].tolist() == [0.5, 3.0]  # inputs untouched


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_extrapolate_rounds_once_from_float32(dtype):
    # Reference in numpy: float32 arithmetic (float64 for float64), then one cast to the base dtype.
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(4096, generator=g, dtype=torch.float64) * 3).to(dtype)
    b = torch.randn(4096, generator=g).to(dtype)
    w = 0.37
    compute = np.float64 if dtype == torch.float64 else np.float32
    a_np, b_np = a.to(torch.float64).numpy().astype(compute), b.to(torch.float64).numpy().astype(compute)
    expected = torch.from_numpy(compute(1 + w) * a_np - compute(w) * b_np).to(dtype)
    merged = extrapolate({"p": a}, {"p": b}, w)["p"]
    assert merged.dtype == dtype
    assert torch.equal(merged, expected)
    if dtype in (torch.float16, torch.bfloat16):
        # The same formula evaluated in the base dtype rounds differently: the check above has teeth.
        assert not torch.equal((1 + w) * a - w * b, expected)


def test_extrapolate_copies_non_floating_and_non_finite_tensors():
    base = {
        "steps": torch.tensor([5, -3], dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "mask": torch.tensor([0.0, -math.inf, 0.0]),
        "nan": torch.tensor([1.0, math.nan], dtype=torch.float16),
        "weight": torch.tensor([4.0, 8.0]),
    }
    self_trained = {
        "steps": torch.tensor([9, 9], dtype=torch.int64),
        "flags": torch.tensor([False, True]),
        "mask": torch.tensor([1.0, 1.0, 1.0]),
        "nan": torch.tensor([2.0, 2.0], dtype=torch.float16),
        "weight": torch.tensor([2.0, 2.0]),
    }
    merged = extrapolate(base, self_trained, 1.0)
    assert list(merged) == list(base)
    assert merged["steps"].dtype == torch.int64 and merged["steps"].tolist() == [5, -3]
    assert merged["flags"].tolist() == [True, False]
    assert merged["mask"].tolist() == [0.0, -math.inf, 0.0]
    assert merged["nan"][0].item() == 1.0 and math.isnan(merged["nan"][1].item())
    assert merged["weight"].tolist() == [6.0, 14.0]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_extrapolate_finds_a_single_non_finite_entry_anywhere(dtype, value):
    for n, position in [(1, 0), (1000, 0), (1000, 517), (1000, 999), (4099, 4098)]:
        a = torch.linspace(-1, 1, n, dtype=dtype)
        a[position] = value
        merged = extrapolate(
            {"x": a, "empty": torch.zeros(0, dtype=dtype)},
            {"x": torch.zeros(n, dtype=dtype), "empty": torch.zeros(0, dtype=dtype)},
            0.5,
        )
        assert merged["x"] is a, (n, position)
        assert merged["empty"].shape == (0,)


@pytest.mark.parametrize("w", [math.nan, math.inf, -math.inf, "0.5", None, True])
def test_extrapolate_rejects_non_finite_w(w):
    sd = {"x": torch.ones(2)}
    with pytest.raises(NeonError, match="w must be"):
        extrapolate(sd, sd, w)


def test_extrapolate_names_the_differing_keys():
    base = {f"layer{i}.weight": torch.zeros(2) for i in range(8)} | {"head": torch.zeros(3, 4)}
    self_trained = {"layer0.weight": torch.zeros(2), "head": torch.zeros(4, 3), "extra.bias": torch.zeros(1)}
    with pytest.raises(NeonError) as info:
        extrapolate(base, self_trained, 0.5)
    message = str(info.value)
    assert "\n" not in message
    assert (
        "missing from self-trained: layer1.weight, layer2.weight, layer3.weight, layer4.weight, "
        "layer5.weight and 2 more"
    ) in message
    assert "not in base: extra.bias" in message
    assert "shapes differ: head [3, 4] vs [4, 3]" in message


# A small θ whose merge at w = 0.5 (1.5·a − 0.5·b) is computed by hand in MERGED.
BASE = {
    "conv.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
    "conv.bias": torch.tensor([1.0, -2.0], dtype=torch.float16),
    "norm.scale": torch.tensor([2.0, 0.5], dtype=torch.bfloat16),
    "norm.steps": torch.tensor([5], dtype=torch.int64),
    "attn.mask": torch.tensor([0.0, -math.inf]),
}
SELF = {
    "conv.weight": torch.tensor([[0.5, 3.0], [3.0, 2.0]]),
    "conv.bias": torch.tensor([0.0, 0.0], dtype=torch.float16),
    "norm.scale": torch.tensor([4.0, 0.5], dtype=torch.bfloat16),
    "norm.steps": torch.tensor([9], dtype=torch.int64),
    "attn.mask": torch.tensor([1.0, 1.0]),
}
MERGED = {
    "conv.weight": [[1.25, 1.5], [3.0, 5.0]],
    "conv.bias": [1.5, -3.0],
    "norm.scale": [1.0, 0.5],
    "norm.steps": [5],
    "attn.mask": [0.0, -math.inf],
}


def _assert_merged(state_dict):
    assert sorted(state_dict) == sorted(BASE)
    for name, values in MERGED.items():
        assert state_dict[name].dtype == BASE[name].dtype, name
        assert state_dict[name].tolist() == values, name


def _shifted(sd, delta):
    return {name: t + delta if t.is_floating_point() else t for name, t in sd.items()}


# Container layouts: (build(θ, tag) -> data, where θ sits). `tag` makes the non-weight entries of
# base and self-trained differ, so the test sees which file they were kept from.
LAYOUTS = {
    "flat": (lambda sd, tag: dict(sd), ()),
    "model_arch": (
        lambda sd, tag: {"model": sd, "arch": {"resolution": 32, "channels": [64], "tag": tag}},
        ("model",),
    ),
    "model_and_ema": (lambda sd, tag: {"model": _shifted(sd, 100.0), "ema": sd, "tag": tag}, ("ema",)),
    "model_ema": (lambda sd, tag: {"model_ema": sd, "optimizer": {"lr": 1e-4, "tag": tag}}, ("model_ema",)),
    "trainer": (
        lambda sd, tag: {"trainer": {"var_wo_ddp": sd, "epoch": 3, "tag": tag}, "args": {"depth": 16}},
        ("trainer", "var_wo_ddp"),
    ),
}


class _Layouts:
    """A family whose format knows every layout of these tests: the core names none of them."""

    name = "layouts"
    format = checkpoint.Format(
        weight_keys=((), ("ema",), ("model_ema",), ("model",), ("trainer", "var_wo_ddp"))
    )


LAYOUT_FAMILY = _Layouts()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_files_keeps_the_base_layout(tmp_path, layout):
    build, key = LAYOUTS[layout]
    checkpoint.write(build(BASE, "base"), tmp_path / "base.pt")
    checkpoint.write(build(SELF, "self"), tmp_path / "self.pt")
    merge_files(
        tmp_path / "base.pt", tmp_path / "self.pt", 0.5, tmp_path / "out" / "neon.pt", family=LAYOUT_FAMILY
    )

    out = checkpoint.read(tmp_path / "out" / "neon.pt", LAYOUT_FAMILY.format)
    assert out.format == "pt" and out.weights_key == key
    assert list(out.weights) == list(BASE)
    _assert_merged(out.weights)
    base = checkpoint.read(tmp_path / "base.pt", LAYOUT_FAMILY.format)
    assert out.data.keys() == base.data.keys()
    for name, value in checkpoint.replaced(base, {}).items():
        if key and name != key[0]:
            assert _plain(out.data[name]) == _plain(value), name  # kept from the base
    if key == ("trainer", "var_wo_ddp"):
        assert out.data["trainer"]["epoch"] == 3 and out.data["trainer"]["tag"] == "base"
    if layout == "model_and_ema":
        # The EMA is θ and is what gets merged; the raw 'model' entry is the base's, unchanged.
        assert out.data["model"]["conv.weight"].tolist() == [[101.0, 102.0], [103.0, 104.0]]


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def test_merge_files_safetensors_streams_and_keeps_metadata(tmp_path):
    base, self_path, out = (tmp_path / f"{name}.safetensors" for name in ("base", "self", "neon"))
    safetensors_torch.save_file(BASE, base, metadata={"format": "pt", "arch": "tiny"})
    safetensors.write(self_path, [(k, t.dtype, t.shape) for k, t in SELF.items()], SELF.values())
    merge_files(base, self_path, 0.5, out, family=LAYOUT_FAMILY)
    header, metadata = safetensors.header(tmp_path / "neon.safetensors")
    assert metadata == {"format": "pt", "arch": "tiny"}
    assert header == safetensors.header(tmp_path / "base.safetensors")[0]
    merged = safetensors_torch.load_file(tmp_path / "neon.safetensors")
    _assert_merged(merged)


def test_merge_files_mixed_formats(tmp_path):
    # A .pt base may be written as plain safetensors, and a .safetensors base may take a .pt self.
    checkpoint.write({"model": BASE, "arch": {"depth": 2}}, tmp_path / "base.pt")
    checkpoint.write({"model": _shifted(SELF, 7.0), "ema": SELF}, tmp_path / "self.pt")
    merge_files(
        tmp_path / "base.pt",
        tmp_path / "self.pt",
        0.5,
        tmp_path / "neon.safetensors",
        format="safetensors",
        family=LAYOUT_FAMILY,
    )
    out = checkpoint.read(tmp_path / "neon.safetensors")
    assert out.weights_key == () and out.metadata == {}
    _assert_merged(out.weights)

    safetensors_torch.save_file(BASE, tmp_path / "base.safetensors")
    merge_files(
        tmp_path / "base.safetensors",
        tmp_path / "self.pt",
        0.5,
        tmp_path / "neon2.safetensors",
        family=LAYOUT_FAMILY,
    )
    _assert_merged(checkpoint.read(tmp_path / "neon2.safetensors").weights)


def test_merge_files_tied_weights_are_extrapolated_once(tmp_path):
    # Tied tensors (one storage under two names) must not be updated in place twice, and a raw
    # 'model' entry sharing storage with the EMA must stay as it was.
    embed = torch.tensor([2.0, 4.0])
    base = {"model": {"embed": embed}, "ema": {"embed": embed, "head": embed, "bias": torch.tensor([1.0])}}
    self_sd = {"embed": torch.zeros(2), "head": torch.zeros(2), "bias": torch.tensor([3.0])}
    checkpoint.write(base, tmp_path / "base.pt")
    checkpoint.write(self_sd, tmp_path / "self.pt")
    merge_files(tmp_path / "base.pt", tmp_path / "self.pt", 1.0, tmp_path / "neon.pt", family=LAYOUT_FAMILY)
    out = checkpoint.read(tmp_path / "neon.pt")
    assert out.weights["embed"].tolist() == [4.0, 8.0] and out.weights["head"].tolist() == [4.0, 8.0]
    assert out.weights["bias"].tolist() == [-1.0]
    assert out.data["model"]["embed"].tolist() == [2.0, 4.0]


def _mismatched_key(d, suffix):
    data = dict(SELF)
    data["conv.extra"] = data.pop("conv.bias")
    _save(data, d / f"self{suffix}")


def _mismatched_shape(d, suffix):
    _save(SELF | {"conv.weight": torch.zeros(2, 3)}, d / f"self{suffix}")


def _corrupt_self(d, suffix):
    (d / f"self{suffix}").write_bytes((d / f"self{suffix}").read_bytes()[:-20])


def _missing_base(d, suffix):
    os.remove(d / f"base{suffix}")


def _save(sd, path):
    if str(path).endswith(".safetensors"):
        safetensors_torch.save_file(sd, path)
    else:
        checkpoint.write(sd, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(
    "case, w, out_name, message",
    [
        (
            _mismatched_key,
            0.5,
            "neon",
            "self.* does not match .*base.*: missing from self-trained: conv.bias; not in base: conv.extra",
        ),
        (_mismatched_shape, 0.5, "neon", r"shapes differ: conv.weight \[2, 2\] vs \[2, 3\]"),
        (None, math.nan, "neon", "w must be finite"),
        (None, math.inf, "neon", "w must be finite"),
        (_corrupt_self, 0.5, "neon", "cannot read checkpoint .*self"),
        (_missing_base, 0.5, "neon", "no such checkpoint: .*base"),
        (None, 0.5, "neon.npz", "unknown checkpoint format"),
        (None, 0.5, "base", "must not overwrite an input"),
    ],
)
def test_merge_files_refusals_write_nothing(tmp_path, suffix, case, w, out_name, message):
    _save(BASE, tmp_path / f"base{suffix}")
    _save(SELF, tmp_path / f"self{suffix}")
    if case is not None:
        case(tmp_path, suffix)
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / (out_name if "." in out_name else out_name + suffix)
    with pytest.raises(NeonError, match=message) as info:
        merge_files(tmp_path / f"base{suffix}", tmp_path / f"self{suffix}", w, out, family=LAYOUT_FAMILY)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary file


def test_merge_files_out_suffix_must_match_the_format(tmp_path):
    checkpoint.write(BASE, tmp_path / "base.pt")
    checkpoint.write(SELF, tmp_path / "self.pt")
    with pytest.raises(NeonError, match="must end in .safetensors"):
        merge_files(
            tmp_path / "base.pt", tmp_path / "self.pt", 0.5, tmp_path / "neon.pt", format="safetensors"
        )
    with pytest.raises(NeonError, match="must end in .pt"):
        merge_files(
            tmp_path / "base.pt",
            tmp_path / "self.pt",
            0.5,
            tmp_path / "neon.safetensors",
            family=LAYOUT_FAMILY,
        )
    assert sorted(os.listdir(tmp_path)) == ["base.pt", "self.pt"]


MEASURE = """
import resource, sys
from neon.merge import merge_files
merge_files(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_merge_files_streams_two_1gib_checkpoints_in_bounded_memory(tmp_path):
    num_tensors, n = 8, 32 * 2**20  # 8 × 128 MiB = 1 GiB per file
    specs = [(f"block{i}.weight", torch.float32, (n // 1024, 1024)) for i in range(num_tensors)]
    # (j mod 1024) + i in the base, i − (j mod 1024) in the self-trained: exact in float32.
    ramp = torch.arange(1024, dtype=torch.float32).repeat(n // 1024, 1)
    for name, sign in [("base", 1.0), ("self", -1.0)]:
        tensors = (sign * ramp + i for i in range(num_tensors))
        safetensors.write(tmp_path / f"{name}.safetensors", specs, tensors)
    assert os.path.getsize(tmp_path / "base.safetensors") > 2**30

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            tmp_path / "base.safetensors",
            tmp_path / "self.safetensors",
            "0.5",
            tmp_path / "neon.safetensors",
        ],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    peak_bytes = int(result.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    assert peak_bytes < 2.5e9, f"peak RSS {peak_bytes / 2**30:.2f} GiB"

    # 1.5·base − 0.5·self = 2·(j mod 1024) + i
    header, _ = safetensors.header(tmp_path / "neon.safetensors")
    assert list(header) == [name for name, _, _ in specs]
    for i in (0, 5, 7):
        ((_, t),) = safetensors.iterate(tmp_path / "neon.safetensors", [f"block{i}.weight"])
        flat = t.view(-1)
        assert [flat[j].item() for j in (0, 1, 1023, 1024, 2047, n - 1)] == [
            i,
            2 + i,
            2046 + i,
            i,
            2046 + i,
            2046 + i,
        ]
