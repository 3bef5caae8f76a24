"""neon.io: θ containers, safetensors streaming (and interop with the safetensors library),
atomic writes, hashing and downloads."""

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch
from safetensors import safe_open

from neon.errors import NeonError
from neon.io import checkpoint, files, safetensors

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _sample(dtype: torch.dtype, shape=(3, 5), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    low = 0 if dtype == torch.uint8 else -100
    return torch.randint(low, 100, shape, generator=g, dtype=dtype)


def _state_dict(seed=0) -> dict[str, torch.Tensor]:
    return {
        "net.weight": _sample(torch.float32, (4, 3), seed),
        "net.bias": _sample(torch.float16, (4,), seed),
        "net.steps": torch.tensor(7),
    }


def _leftovers(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _assert_same(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_safetensors_written_by_us_load_in_the_library(tmp_path, dtype):
    tensors = {"x": _sample(dtype), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 4))}
    path = tmp_path / "ours.safetensors"
    specs = [(name, t.dtype, t.shape) for name, t in tensors.items()]
    safetensors.write(path, specs, iter(tensors.values()), {"source": "neon"})
    loaded = safetensors_torch.load_file(path)
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"source": "neon"}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_safetensors_written_by_the_library_read_by_us(tmp_path, dtype):
    tensors = {
        "b": _sample(dtype, (2, 3, 4), seed=1),
        "a": _sample(dtype, (5,), seed=2),
        "s": _sample(dtype, ()),
    }
    path = tmp_path / "theirs.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    header, metadata = safetensors.header(path)
    assert metadata == {"format": "pt"}
    assert header == {name: (dtype, tuple(t.shape)) for name, t in tensors.items()}
    streamed = dict(safetensors.iterate(path))
    assert list(streamed) == list(header)  # file order
    for name, t in tensors.items():
        assert streamed[name].dtype == dtype and torch.equal(streamed[name], t), name
    container = checkpoint.read(path)
    assert (container.format, container.weights_key, container.metadata) == ("safetensors", (), metadata)


def test_safetensors_header_order_padding_and_selection(tmp_path):
    # A hand-built file: header space-padded, header order differing from data order.
    a = torch.tensor([1.5, -2.0], dtype=torch.float32)
    b = torch.tensor([[3, 4]], dtype=torch.int64)
    header = {
        "b": {"dtype": "I64", "shape": [1, 2], "data_offsets": [8, 24]},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "__metadata__": {"note": "hand-made"},
    }
    raw = json.dumps(header).encode() + b" " * 13
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + b.numpy().tobytes())

    names, metadata = safetensors.header(path)
    assert list(names) == ["a", "b"] and names["b"] == (torch.int64, (1, 2))
    assert metadata == {"note": "hand-made"}
    assert [(n, t.tolist()) for n, t in safetensors.iterate(path, ["b", "a"])] == [
        ("b", [[3, 4]]),
        ("a", [1.5, -2.0]),
    ]
    with pytest.raises(NeonError, match="no tensor named c"):
        list(safetensors.iterate(path, ["a", "c"]))


def test_write_safetensors_streams_from_a_generator_and_checks_specs(tmp_path):
    specs = [(f"t{i}", torch.float32, (2, 3)) for i in range(3)]
    produced = []

    def tensors():
        for i in range(3):
            produced.append(i)
            yield torch.full((3, 2), float(i)).t()  # non-contiguous on purpose

    path = tmp_path / "gen.safetensors"
    safetensors.write(path, specs, tensors())
    assert produced == [0, 1, 2]
    loaded = safetensors_torch.load_file(path)
    assert [loaded[f"t{i}"].tolist() for i in range(3)] == [[[float(i)] * 3] * 2 for i in range(3)]

    bad = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=r"t1: got torch.float32 \[2, 2\]"):
        safetensors.write(bad, specs, [torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="ran out before 't2'"):
        safetensors.write(bad, specs, [torch.zeros(2, 3)] * 2)
    with pytest.raises(ValueError, match="more tensors"):
        safetensors.write(bad, specs, [torch.zeros(2, 3)] * 4)
    assert _leftovers(tmp_path) == ["gen.safetensors"]


LAYOUTS = {
    "flat": (lambda sd: sd, ()),
    "ema": (lambda sd: {"model": _state_dict(seed=9), "ema": sd, "step": 10}, ("ema",)),
    "model_ema": (lambda sd: {"model": _state_dict(seed=9), "model_ema": sd}, ("model_ema",)),
    "ema_model": (lambda sd: {"ema_model": sd, "optimizer": {"lr": 0.1}}, ("ema_model",)),
    "model": (lambda sd: {"model": sd, "arch": {"depth": 2, "widths": [4, 8]}}, ("model",)),
    "state_dict": (lambda sd: {"state_dict": sd, "epoch": 1}, ("state_dict",)),
    "net": (lambda sd: {"net": sd}, ("net",)),
    "var_wo_ddp": (lambda sd: {"var_wo_ddp": sd, "vae": "vae.pth"}, ("var_wo_ddp",)),
    "trainer": (
        lambda sd: {"trainer": {"var_wo_ddp": sd, "epoch": 3}, "args": {"depth": 16}},
        ("trainer", "var_wo_ddp"),
    ),
}


# The core names no family's keys: a format declares them (here every layout above).
LAYOUTS_FORMAT = checkpoint.Format(weight_keys=tuple(key for _, key in LAYOUTS.values()))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_read_locates_weights_preferring_the_ema(tmp_path, layout):
    build, key = LAYOUTS[layout]
    sd = _state_dict()
    path = tmp_path / "ckpt.pt"
    checkpoint.write(build(sd), path)
    container = checkpoint.read(path, LAYOUTS_FORMAT)
    assert container.format == "pt" and container.weights_key == key and container.metadata == {}
    _assert_same(container.weights, sd)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_write_like_keeps_the_layout(tmp_path, layout):
    build, key = LAYOUTS[layout]
    path = tmp_path / "base.pth"
    data = build(_state_dict())
    checkpoint.write(data, path)
    container = checkpoint.read(path, LAYOUTS_FORMAT)
    new_sd = _state_dict(seed=5)
    out = tmp_path / "out" / "merged.pth"
    checkpoint.write_like(container, new_sd, out)
    written = checkpoint.read(out, LAYOUTS_FORMAT)
    assert written.weights_key == key
    _assert_same(written.weights, new_sd)
    # Everything but θ is what the base held.
    expected = checkpoint.replaced(container, new_sd)
    assert written.data.keys() == expected.keys()
    if key:
        assert _strip(written.data, key) == _strip(data, key)


def _strip(data, key):
    """`data` with the weights entry removed and tensors turned into lists, for comparison."""
    data = checkpoint.replaced(checkpoint.Container("", "pt", data, key), {})
    return json.loads(json.dumps(data, default=lambda t: t.tolist()))


def test_replaced_copies_only_the_enclosing_dicts():
    sd, new_sd = _state_dict(), _state_dict(seed=1)
    data = {"trainer": {"var_wo_ddp": sd, "epoch": 3}, "args": {"depth": 16}}
    container = checkpoint.Container("x.pt", "pt", data, ("trainer", "var_wo_ddp"))
    out = checkpoint.replaced(container, new_sd)
    assert out["trainer"]["var_wo_ddp"] is new_sd and out["trainer"]["epoch"] == 3
    assert out["args"] is data["args"]
    assert data["trainer"]["var_wo_ddp"] is sd  # the original is untouched


def test_write_like_safetensors_from_pt_and_same_for_safetensors(tmp_path):
    sd = _state_dict()
    checkpoint.write({"model": _state_dict(seed=3), "ema": sd}, tmp_path / "base.pt")
    container = checkpoint.read(tmp_path / "base.pt")
    checkpoint.write_like(container, sd, tmp_path / "plain.safetensors", format="safetensors")
    _assert_same(safetensors_torch.load_file(tmp_path / "plain.safetensors"), sd)

    safetensors_torch.save_file(sd, tmp_path / "base.safetensors", metadata={"format": "pt", "w": "1"})
    container = checkpoint.read(tmp_path / "base.safetensors")
    new_sd = {name: t + 1 for name, t in container.weights.items()}
    checkpoint.write_like(container, new_sd, tmp_path / "same.safetensors")
    assert checkpoint.read(tmp_path / "same.safetensors").metadata == {"format": "pt", "w": "1"}
    _assert_same(safetensors_torch.load_file(tmp_path / "same.safetensors"), new_sd)

    with pytest.raises(NeonError, match="must end in .safetensors"):
        checkpoint.write_like(container, new_sd, tmp_path / "wrong.pt")
    with pytest.raises(NeonError, match="unknown output format"):
        checkpoint.write_like(container, new_sd, tmp_path / "x.safetensors", format="npz")


def test_read_with_mmap(tmp_path):
    sd = _state_dict()
    checkpoint.write({"model": sd}, tmp_path / "m.pt")
    _assert_same(checkpoint.read(tmp_path / "m.pt", mmap=True).weights, sd)


def _garbage(path):
    path.write_bytes(b"this is not a checkpoint at all" * 10)


def _truncated_pt(path):
    checkpoint.write(_state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])


def _list_pt(path):
    checkpoint.write([torch.zeros(2)], path)


def _no_weights_pt(path):
    checkpoint.write({"epoch": 3, "args": {"lr": 1.0}, "model": {}}, path)


def _truncated_st(path):
    safetensors_torch.save_file(_state_dict(), path)
    path.write_bytes(path.read_bytes()[:-4])


def _huge_header_st(path):
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")


def _bad_dtype_st(path):
    raw = json.dumps({"x": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("garbage.pt", _garbage, "cannot read checkpoint .*garbage.pt: "),
        ("truncated.pt", _truncated_pt, "cannot read checkpoint .*truncated.pt: "),
        ("list.pt", _list_pt, "top level is a list, not a dict"),
        ("empty.pth", lambda p: p.write_bytes(b""), "cannot read checkpoint .*empty.pth: "),
        ("no_weights.pt", _no_weights_pt, r"no state dict found \(top-level keys: epoch, args, model\)"),
        ("garbage.safetensors", _garbage, "cannot read checkpoint .*garbage.safetensors: "),
        # the safetensors library's own diagnoses, on one line
        (
            "truncated.safetensors",
            _truncated_st,
            "cannot read checkpoint .*truncated.safetensors: .*not fully covered",
        ),
        (
            "huge.safetensors",
            _huge_header_st,
            "cannot read checkpoint .*huge.safetensors: .*header too large",
        ),
        (
            "dtype.safetensors",
            _bad_dtype_st,
            "cannot read checkpoint .*dtype.safetensors: .*unknown variant `F8`",
        ),
        ("net.pkl", _garbage, "cannot read network pickle .*net.pkl: "),
        ("weights.npz", _garbage, "unknown checkpoint format"),
    ],
)
def test_read_errors_are_one_line(tmp_path, name, make, message):
    make(tmp_path / name)
    with pytest.raises(NeonError, match=message) as info:
        checkpoint.read(tmp_path / name)
    assert "\n" not in str(info.value)


def test_read_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(NeonError, match=f"no such checkpoint: {missing}"):
        checkpoint.read(missing)
    with pytest.raises(NeonError, match="no such checkpoint"):
        safetensors.header(tmp_path / "nope.safetensors")


class _Callback:
    pass


def test_read_refuses_arbitrary_pickles(tmp_path):
    checkpoint.write({"model": _state_dict(), "callback": _Callback()}, tmp_path / "evil.pt")
    refused = r"cannot read checkpoint .*evil.pt: weights_only=True refused it: Unsupported global: .*_Call"
    with pytest.raises(NeonError, match=refused):
        checkpoint.read(tmp_path / "evil.pt")


def test_atomic_replaces_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "deep" / "dir" / "shard-00000.npz"
    with files.atomic(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".npz")
        assert os.path.basename(tmp).startswith(".")  # hidden from snapshot globs
        np.savez(tmp, samples=np.arange(3))
    assert np.load(target)["samples"].tolist() == [0, 1, 2]
    assert _leftovers(target.parent) == ["shard-00000.npz"]

    with pytest.raises(RuntimeError, match="boom"):
        with files.atomic(target) as tmp:
            np.savez(tmp, samples=np.arange(5))
            raise RuntimeError("boom")
    assert np.load(target)["samples"].tolist() == [0, 1, 2]  # the old file is untouched
    assert _leftovers(target.parent) == ["shard-00000.npz"]


def test_write_json_and_text(tmp_path):
    files.write_json(tmp_path / "m" / "manifest.json", {"shards": ["a", "b"], "n": 3})
    expected = '{\n  "shards": [\n    "a",\n    "b"\n  ],\n  "n": 3\n}\n'
    assert (tmp_path / "m" / "manifest.json").read_text() == expected
    files.write_text(tmp_path / "note.txt", "fid 2.5\n")
    assert (tmp_path / "note.txt").read_text() == "fid 2.5\n"
    with pytest.raises(TypeError):
        files.write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["m", "note.txt"]


def test_write_is_atomic(tmp_path):
    checkpoint.write({"model": _state_dict()}, tmp_path / "a" / "snap.pt")
    _assert_same(checkpoint.read(tmp_path / "a" / "snap.pt").weights, _state_dict())
    with pytest.raises(Exception):
        checkpoint.write({"f": lambda: 0}, tmp_path / "a" / "bad.pt")
    assert _leftovers(tmp_path / "a") == ["snap.pt"]


def test_sha256_streams_whole_file(tmp_path):
    data = bytes(range(256)) * (5 * 2**12 + 3)  # > 1 MiB, not a multiple of the chunk
    (tmp_path / "blob").write_bytes(data)
    assert files.sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_download_file_url_once(tmp_path):
    source = tmp_path / "src" / "model v1.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights-v1")
    dest_dir = tmp_path / "cache"
    url = source.as_uri()  # file:///.../model%20v1.pt
    path = files.download(url, dest_dir)
    assert path == os.path.join(dest_dir, "model v1.pt")
    assert open(path, "rb").read() == b"weights-v1"
    source.write_bytes(b"weights-v2")
    assert files.download(url, dest_dir) == path
    assert open(path, "rb").read() == b"weights-v1"  # fetched once, not again
    assert files.download(str(source), dest_dir) == str(source)  # a local path as it is


def test_download_errors(tmp_path):
    with pytest.raises(NeonError, match="cannot download file:///.*missing.pt: ") as info:
        files.download((tmp_path / "missing.pt").as_uri(), tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "cache" / "missing.pt")
    assert os.listdir(tmp_path / "cache") == []
    with pytest.raises(NeonError, match="no such file"):
        files.download(str(tmp_path / "missing.pt"), tmp_path / "cache")
