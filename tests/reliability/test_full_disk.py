"""A disk that fills during `sample`, `finetune`, `sweep` and `merge`: one line naming the path and the
OS reason, exit 2, no temporary left, what was complete before kept; after space is freed the same
command resumes and ends with exactly what an uninterrupted run makes.

The output folder is a small tmpfs the test mounts (as root; skipped where mounting is refused), and
the disk is filled from inside the work (`Hooked` from the preemption tests), so the write it breaks is
known: a shard, a snapshot or training state, a results line, a merged checkpoint.
"""

import contextlib
import errno
import json
import os
import subprocess

import pytest
import torch

from neon import cli, finetune
from neon import family as neon_family
from neon.io import checkpoint, files
from tests.conftest import save_base
from tests.reliability.test_preemption import Hooked, _exit, _finetune_args, _same_state, _sweep_args

pytestmark = pytest.mark.usefixtures("one_thread")


class Disk:
    """A mounted tmpfs: `fill()` takes all its free space with one file, `free()` removes it."""

    def __init__(self, path: str):
        self.path = path
        self.filler = os.path.join(path, "filler")

    def fill(self) -> None:
        with contextlib.suppress(OSError), open(self.filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)

    def free(self) -> None:
        os.remove(self.filler)

    def temporaries(self) -> list[str]:
        return [
            os.path.join(root, n)
            for root, dirs, names in os.walk(self.path)
            for n in names + dirs
            if files._TEMPORARY.match(n)
        ]


@pytest.fixture
def disk(tmp_path):
    path = str(tmp_path / "disk")
    os.makedirs(path)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", path], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs as the full disk ({mounted.stderr.strip() or 'not root'})")
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def _full(code, err, path):
    """The one line of a full disk, naming `path` (a file, or a folder holding the file named)."""
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {path}") and os.strerror(errno.ENOSPC).lower() in err, err


def test_a_results_line_that_does_not_fit_is_not_left_torn(disk):
    path = os.path.join(disk.path, "results.jsonl")
    files.append_jsonl(path, {"w": 0.5})
    disk.fill()
    with pytest.raises(OSError) as info:
        files.append_jsonl(path, {"w": 1.0, "pad": "x" * 8192})  # more than the page the file has
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    assert open(path).read() == '{"w": 0.5}\n'


def test_a_full_disk_during_sample(disk, tmp_path, base_ckpt, synthetic_set, monkeypatch, capsys):
    out = os.path.join(disk.path, "S")
    argv = [
        "sample",
        "--family",
        "toy",
        "--ckpt",
        base_ckpt,
        "--out",
        out,
        "--num-images",
        "96",
        "--batch-size",
        "16",
        "--shard-size",
        "24",
        "--synthetic.labels",
        "none",
        "--sampler.zeta",
        "1.1",
    ]
    with monkeypatch.context() as m:
        m.setattr(neon_family, "get", lambda spec: Hooked("sample", 5, disk.fill))  # in the 3rd shard
        code, err = _exit(argv, capsys)
    _full(code, err, os.path.join(out, "shard-00002.npz"))
    assert not disk.temporaries() and sorted(n for n in os.listdir(out) if n.startswith("shard-")) == [
        "shard-00000.npz",
        "shard-00001.npz",
    ]  # the complete shards stay
    disk.free()
    cli.main(list(map(str, argv)))
    for name in sorted(os.listdir(synthetic_set)):
        if name.startswith("shard-"):
            with open(os.path.join(out, name), "rb") as a, open(os.path.join(synthetic_set, name), "rb") as b:
                assert a.read() == b.read()


def test_a_full_disk_during_finetune(disk, tmp_path, base_ckpt, synthetic_set, monkeypatch, capsys):
    run, whole = os.path.join(disk.path, "run"), str(tmp_path / "whole")
    with monkeypatch.context() as m:
        m.setattr(neon_family, "get", lambda spec: Hooked("loss", 6, disk.fill))  # before the snapshot at 128
        code, err = _exit(_finetune_args(base_ckpt, synthetic_set, run), capsys)
    _full(code, err, os.path.join(run, "snapshot-0000000128.pt"))
    assert not disk.temporaries()
    assert checkpoint.read_state(os.path.join(run, finetune.STATE))["images_seen"] == 64
    disk.free()
    cli.main(list(map(str, _finetune_args(base_ckpt, synthetic_set, run))))
    cli.main(list(map(str, _finetune_args(base_ckpt, synthetic_set, whole))))
    _same_state(run, whole)


def test_a_full_disk_during_sweep_and_merge(disk, tmp_path, base_ckpt, synthetic_set, monkeypatch, capsys):
    cli.main(list(map(str, _finetune_args(base_ckpt, synthetic_set, tmp_path / "run", "--images", "64"))))
    out = os.path.join(disk.path, "sweep")
    argv = _sweep_args(base_ckpt, tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(neon_family, "get", lambda spec: Hooked("sample", 2, disk.fill))  # in the 2nd point
        code, err = _exit(argv + ["--out", out], capsys)
    err = err.splitlines(keepends=True)[-1]  # after the result lines
    _full(code, err, out)  # a results line fits in its file's last page: the pictures at the end do not
    assert not disk.temporaries()
    assert [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]  # whole lines only
    disk.free()
    cli.main(list(map(str, argv + ["--out", out])))
    cli.main(list(map(str, argv + ["--out", tmp_path / "whole"])))
    results = [
        [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in files.read_jsonl(os.path.join(d, "results.jsonl"))
        ]
        for d in (out, str(tmp_path / "whole"))
    ]
    assert results[0] == results[1] and len(results[0]) == 3

    base, merged = save_base(tmp_path / "base.pt"), os.path.join(disk.path, "neon.pt")
    snapshot = os.path.join(tmp_path, "run", "snapshot-0000000064.pt")
    merge = ["merge", "--base", base, "--self", snapshot, "--w", "1"]
    capsys.readouterr()
    disk.fill()
    code, err = _exit(merge + ["--out", merged], capsys)
    _full(code, err, merged)
    assert not disk.temporaries() and not os.path.exists(merged)
    disk.free()
    cli.main(merge + ["--out", merged])
    cli.main(merge + ["--out", str(tmp_path / "neon.pt")])
    one, two = (checkpoint.read(p).weights for p in (merged, str(tmp_path / "neon.pt")))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_read_only_disk_is_refused_before_any_work(disk, base_ckpt, capsys):
    os.makedirs(os.path.join(disk.path, "S"))
    subprocess.run(["mount", "-o", "remount,ro", disk.path], check=True)
    merged = os.path.join(disk.path, "m.pt")
    code, err = _exit(
        ["merge", "--base", base_ckpt, "--self", base_ckpt, "--w", "1", "--out", merged], capsys
    )
    assert code == 2 and err == f"error: cannot create {merged}: {disk.path} is on a read-only file system\n"
    out = os.path.join(disk.path, "S")
    code, err = _exit(
        ["sample", "--family", "toy", "--ckpt", base_ckpt, "--out", out, "--num-images", "8"], capsys
    )
    assert code == 2 and err == f"error: cannot create {out}: {out} is on a read-only file system\n"
