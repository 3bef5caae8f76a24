"""Host memory of the sweep per process, on a network of more than 1 GiB, with two processes.

Writes a base and a self-trained `.pt` checkpoint (`{'ema': state_dict}`: `--tensors` float32 tensors of
`--numel` elements, 1.1 GiB by default) and a 2-D stand-in family whose network is that big but whose
samples are cheap (each sample reads a few weights of every tensor, so θ_neon(w) decides them). Then,
under `torchrun --nproc_per_node=2` (gloo, CPU), each process scores the same three points (the base,
w = 0.5 and w = 1) two ways, each in a fresh pair of processes:

  ours:      `neon.sweep.run` (base and snapshot memory-mapped, θ_neon written into the network tensor by
             tensor, `neon.evaluate.evaluate`);
  baseline:  what the sweep did before (the base read and cloned, the snapshot read whole for each point,
             `merge.extrapolate` building a third copy, `load_state_dict`), scored by the same path.

Each process polls /proc/self/status and reports its peaks of anonymous (RssAnon) and file-backed
(RssFile) resident memory, in checkpoints. The network lives on the CPU here, so it is one checkpoint of
anonymous memory in both; on a GPU it moves to the device. File-backed pages are the shared page cache
(both processes map the same files) and the kernel reclaims them under pressure.

    python benchmarks/sweep_memory.py                      # 16 × 18Mi float32 = 1.1 GiB per checkpoint
    python benchmarks/sweep_memory.py --tensors 8 --numel 4194304
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neon.io import checkpoint  # noqa: E402

CHILD = """
import json, os, sys, threading, time
peaks = {"RssAnon": 0, "RssFile": 0}
def poll():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
        time.sleep(0.002)
threading.Thread(target=poll, daemon=True).start()
import torch
from benchmarks.sweep_memory import big, evaluate_points
from neon import distributed
distributed.init()
time.sleep(0.05)
idle = dict(peaks)
fids = evaluate_points(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
time.sleep(0.05)
print(json.dumps({"rank": distributed.rank(), "idle": idle, "peaks": peaks, "fids": fids}))
distributed.shutdown()
"""


class BigNet(torch.nn.Module):
    """`tensors` flat float32 parameters `block{i}.weight` of `numel` elements each."""

    def __init__(self, tensors: int = 16, numel: int = 18 * 2**20):
        super().__init__()
        self.block = torch.nn.ModuleList(_Flat(numel) for _ in range(tensors))


class _Flat(torch.nn.Module):
    def __init__(self, numel: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(numel))


class BigFamily:
    """A 2-D stand-in family with a big network: sample i is noise from seed i shifted by the mean of the
    first 1024 weights of every tensor (so every tensor's θ_neon matters); features are the points."""

    name = "big"
    format = checkpoint.Format(weight_keys=(("ema",), ()))

    @dataclasses.dataclass(frozen=True)
    class Sampler:
        scale: float = 1.0

    def load(self, path, arch=None, device="cpu", codec=None):
        from neon.family import Model, load_built

        shapes = {k: v.shape for k, v in checkpoint.read(path, self.format, mmap=True).weights.items()}
        with torch.device("meta"):
            net = BigNet(len(shapes), next(iter(shapes.values()))[0])
        return Model(net=load_built(net, checkpoint.read(path, self.format).weights, path, "BigNet", device))

    def sample(self, model, labels, seeds, sampler):
        shift = torch.stack([b.weight[:1024].mean() for b in model.net.block]).sum()
        noise = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return (noise * sampler.scale + shift).float()

    def features(self, samples):
        return samples.double()

    def reference(self):
        return torch.zeros(2).double().numpy(), torch.eye(2).double().numpy()


big = BigFamily()
W = (0.0, 0.5, 1.0)


def evaluate_points(approach: str, base: str, snapshot: str, out: str) -> list[float]:
    """Collective: the FIDs of W, scored the way `approach` ('ours' or 'baseline') builds θ_neon."""
    from neon import evaluate, merge, progress, sweep
    from neon.family import read_checkpoint

    model = big.load(base)
    if approach == "ours":
        conf = sweep.SweepConfig(self_trained=snapshot, w=list(W), num=64, batch_size=64, out=out)
        progress.last(sweep.run(big, model, base, big.Sampler(), conf))
        return [r["fid"] for r in sweep.load_results(out)]
    base_sd = {k: v.clone() for k, v in read_checkpoint(big, base).weights.items()}
    metrics = evaluate.Metrics(big.reference())
    fids = []
    for w in W:
        if w == 0:
            model.net.load_state_dict(base_sd)
        else:
            self_sd = read_checkpoint(big, snapshot).weights
            model.net.load_state_dict(merge.extrapolate(base_sd, self_sd, w))
            del self_sd
        fids.append(
            evaluate.evaluate(
                big,
                model,
                base_sd,
                big.Sampler(),
                (1_000_000, 64),
                64,
                metrics,
                control=model.net.state_dict(),
            )["fid"]
        )
    return fids


def run_pair(approach: str, base: str, snapshot: str, out: str) -> list[dict]:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "--no-python",
            sys.executable,
            "-c",
            CHILD,
            approach,
            base,
            snapshot,
            out,
        ],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return sorted(
        (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=16, help="tensors per checkpoint")
    parser.add_argument("--numel", type=int, default=18 * 2**20, help="float32 elements per tensor")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base, snapshot = os.path.join(tmp, "base.pt"), os.path.join(tmp, "snapshot-0000000001.pt")
        for path, seed in ((base, 0), (snapshot, 1)):
            g = torch.Generator().manual_seed(seed)
            checkpoint.write(
                {
                    "ema": {
                        f"block.{i}.weight": torch.randn(args.numel, generator=g) * 0.01
                        for i in range(args.tensors)
                    }
                },
                path,
            )
        size = os.path.getsize(base)
        print(
            f"checkpoint: {args.tensors} x {args.numel} float32 = {size / 2**30:.2f} GiB; "
            "2 processes, 3 points"
        )
        rows = {
            approach: run_pair(approach, base, snapshot, os.path.join(tmp, approach))
            for approach in ("baseline", "ours")
        }
    for approach, ranks in rows.items():
        for r in ranks:
            anon = r["peaks"]["RssAnon"] - r["idle"]["RssAnon"]
            file = r["peaks"]["RssFile"] - r["idle"]["RssFile"]
            print(
                f"{approach:<9} rank {r['rank']}: anonymous {anon / size:5.2f}x  "
                f"file-backed {file / size:5.2f}x  "
                f"checkpoint above idle; FIDs {', '.join(f'{f:.4f}' for f in r['fids'])}"
            )
    worst = {a: max(r["peaks"]["RssAnon"] - r["idle"]["RssAnon"] for r in ranks) for a, ranks in rows.items()}
    same = all(abs(a - b) < 1e-9 for a, b in zip(rows["ours"][0]["fids"], rows["baseline"][0]["fids"]))
    print(
        f"ours / baseline, peak anonymous per process: {worst['ours'] / worst['baseline']:.2f}x "
        f"({worst['ours'] / size:.2f}x vs {worst['baseline'] / size:.2f}x one checkpoint); same FIDs: {same}"
    )


if __name__ == "__main__":
    main()
