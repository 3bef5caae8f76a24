"""Peak memory of `neon.merge.merge_files` on two large .safetensors checkpoints.

Writes a base and a self-trained checkpoint (float32 tensors) into a temporary directory, then
runs each merge in a fresh process and reads its peak RSS (`ru_maxrss`):

  idle:      `import torch, neon.merge` and nothing else (the floor every process pays);
  naive:     the baseline, `safetensors.torch.load_file` of both files, extrapolate, `save_file`;
  streamed:  `merge_files`, which reads and writes one tensor at a time.

Ratios are against the checkpoint size and against the naive merge measured in the same run.

Then the same for two `.pt` files (`{'ema': state_dict}`), where `merge_files` loads the base and
memory-maps the self-trained file. Its pages count in RSS but are file-backed (the kernel drops
them under pressure), so this part polls /proc/self/status and reports the peaks of anonymous
(RssAnon) and file-backed (RssFile) memory above an idle process, against a naive merge that
`torch.load`s both files.

    python benchmarks/merge_memory.py                          # 8 × 32Mi float32: two 1 GiB files
    python benchmarks/merge_memory.py --tensors 4 --numel 8388608
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neon.io import checkpoint, safetensors  # noqa: E402

MEASURE = "import resource, sys\n{body}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
IDLE = "import torch, neon.merge"
NAIVE = """
import torch
from safetensors.torch import load_file, save_file
base, self_sd, w = load_file(sys.argv[1]), load_file(sys.argv[2]), float(sys.argv[3])
merged = {k: ((1 + w) * base[k].float() - w * self_sd[k].float()).to(base[k].dtype) for k in base}
save_file(merged, sys.argv[4])
"""
STREAMED = """
from neon.merge import merge_files
merge_files(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
"""


POLLED = """
import threading, time
peaks = {{"RssAnon": 0, "RssFile": 0}}
def poll():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
        time.sleep(0.002)
threading.Thread(target=poll, daemon=True).start()
{body}
time.sleep(0.05)
print(peaks["RssAnon"], peaks["RssFile"])
"""
NAIVE_PT = """
import torch
from neon import merge
from neon.io import checkpoint
base, self_sd = checkpoint.read(sys.argv[1]), checkpoint.read(sys.argv[2])
checkpoint.write({"ema": merge.extrapolate(base.weights, self_sd.weights, float(sys.argv[3]))}, sys.argv[4])
"""


def peak_anon_file(body: str, *args) -> tuple[int, int]:
    """(peak anonymous, peak file-backed resident bytes) of `body` in a fresh Python process."""
    script = "import sys\n" + POLLED.format(body=body)
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        check=True,
    )
    anon, file = result.stdout.split()[-2:]
    return int(anon), int(file)


def peak_rss(body: str, *args) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of `body` run in a fresh Python process."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE.format(body=body), *map(str, args)],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[-1]) * 1024, time.perf_counter() - start  # ru_maxrss is KiB on Linux


def write_checkpoint(path: str, num_tensors: int, numel: int, seed: int) -> None:
    specs = [(f"block{i}.weight", torch.float32, (numel,)) for i in range(num_tensors)]
    g = torch.Generator().manual_seed(seed)
    safetensors.write(path, specs, (torch.randn(numel, generator=g) for _ in range(num_tensors)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=8, help="tensors per checkpoint")
    parser.add_argument("--numel", type=int, default=32 * 2**20, help="float32 elements per tensor")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base, self_path = os.path.join(tmp, "base.safetensors"), os.path.join(tmp, "self.safetensors")
        write_checkpoint(base, args.tensors, args.numel, seed=0)
        write_checkpoint(self_path, args.tensors, args.numel, seed=1)
        size = os.path.getsize(base)
        tensor_bytes = args.numel * 4
        print(f"checkpoint: {args.tensors} x {args.numel} float32 = {size / 2**30:.2f} GiB per file")

        idle, _ = peak_rss(IDLE)
        naive, naive_s = peak_rss(NAIVE, base, self_path, 0.5, os.path.join(tmp, "naive.safetensors"))
        streamed, streamed_s = peak_rss(STREAMED, base, self_path, 0.5, os.path.join(tmp, "neon.safetensors"))
        naive_out = os.path.join(tmp, "naive.safetensors")
        streamed_out = os.path.join(tmp, "neon.safetensors")
        names = list(safetensors.header(streamed_out)[0])
        pairs = zip(safetensors.iterate(naive_out, names), safetensors.iterate(streamed_out, names))
        same = all(torch.equal(a, b) for (_, a), (_, b) in pairs)

    gib = 2**30
    print(f"idle     peak RSS {idle / gib:6.2f} GiB")
    print(f"naive    peak RSS {naive / gib:6.2f} GiB  {naive / size:5.2f}x checkpoint  {naive_s:5.1f} s")
    print(
        f"streamed peak RSS {streamed / gib:6.2f} GiB  {streamed / size:5.2f}x checkpoint  "
        f"{streamed_s:5.1f} s"
    )
    print(
        f"streamed / naive: {streamed / naive:.2f}x peak RSS, {streamed_s / naive_s:.2f}x time; "
        f"above idle: {(streamed - idle) / tensor_bytes:.1f} tensors streamed vs "
        f"{(naive - idle) / tensor_bytes:.1f} naive"
    )
    print(f"outputs equal, tensor by tensor: {same}")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base, self_path = os.path.join(tmp, "base.pt"), os.path.join(tmp, "self.pt")
        for path, seed in ((base, 0), (self_path, 1)):
            g = torch.Generator().manual_seed(seed)
            checkpoint.write(
                {
                    "ema": {
                        f"block{i}.weight": torch.randn(args.numel, generator=g) for i in range(args.tensors)
                    }
                },
                path,
            )
        size = os.path.getsize(base)
        idle_anon, idle_file = peak_anon_file(IDLE)
        naive_anon, naive_file = peak_anon_file(NAIVE_PT, base, self_path, 0.5, os.path.join(tmp, "naive.pt"))
        ours_anon, ours_file = peak_anon_file(STREAMED, base, self_path, 0.5, os.path.join(tmp, "neon.pt"))
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                checkpoint.read(os.path.join(tmp, "naive.pt")).weights.values(),
                checkpoint.read(os.path.join(tmp, "neon.pt")).weights.values(),
            )
        )
    print(f".pt: {size / gib:.2f} GiB per file; peaks above an idle process, in checkpoints")
    print(
        f"naive        anonymous {(naive_anon - idle_anon) / size:5.2f}x  "
        f"file-backed {(naive_file - idle_file) / size:5.2f}x"
    )
    print(
        f"merge_files  anonymous {(ours_anon - idle_anon) / size:5.2f}x  "
        f"file-backed {(ours_file - idle_file) / size:5.2f}x"
    )
    print(
        f"merge_files / naive anonymous: {(ours_anon - idle_anon) / (naive_anon - idle_anon):.2f}x; "
        f"outputs equal: {same}"
    )


if __name__ == "__main__":
    main()
