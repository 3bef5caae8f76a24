"""Images per second of FID statistics: our in-memory path against the PNG round trip.

Both paths start from the same uint8 images in memory (what a sampler returns) and end with the
Inception statistics (mu, sigma) on rank 0:

  in memory:   every rank computes the features of its batches (`neon.metrics.inception.extract`)
               and the features are gathered in order; no file is written.
  round trip:  the Neon authors' scripts: every rank writes its images as PNG files, then rank 0
               alone runs torch-fidelity on the folder (its DataLoader decodes the PNGs).

Run it in one process or under torchrun; torchrun gives each process one thread
(OMP_NUM_THREADS=1), as each GPU is one device:

    python benchmarks/fid_throughput.py
    torchrun --standalone --nproc_per_node=2 benchmarks/fid_throughput.py [--images 64] [--size 256]

Without --inception-weights (or checkpoints/weights-inception-2015-12-05-6726825d.pth) it uses an
untrained InceptionV3 with recalibrated batch norm: the speed is the same, the numbers are not FIDs
of anything.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neon import distributed  # noqa: E402
from neon.io import checkpoint  # noqa: E402
from neon.metrics import fid, images, inception  # noqa: E402


def make_images(num: int, size: int) -> torch.Tensor:
    """uint8 [num,3,size,size]: smooth random colour fields with a little noise, photo-like enough
    that PNG compresses them as it compresses samples."""
    g = torch.Generator().manual_seed(0)
    low = torch.nn.functional.interpolate(torch.rand(num, 3, 8, 8, generator=g), size=size, mode="bicubic")
    return (
        ((low + 0.05 * torch.randn(num, 3, size, size, generator=g)).clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
    )


def in_memory(extractor, batch: torch.Tensor, batch_size: int):
    source = images.Images("memory", tuple(batch.shape[1:]), [batch.permute(0, 2, 3, 1).numpy()])
    *_, last = inception.extract(extractor, source, batch_size)
    return fid.statistics(last.result["pool"])


def round_trip(fidelity_extractor, batch: torch.Tensor, batch_size: int, folder: str):
    from PIL import Image
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics
    from torch_fidelity.utils import extract_featuresdict_from_input_id

    for i in distributed.shard(len(batch)):  # every rank writes its own images
        Image.fromarray(batch[i].permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:06d}.png"))
    distributed.barrier()
    result = None
    if distributed.is_main():  # rank 0 alone reads them back
        features = extract_featuresdict_from_input_id(
            1,
            fidelity_extractor,
            input1=folder,
            cuda=torch.cuda.is_available(),
            batch_size=batch_size,
            verbose=False,
            cache=False,
        )
        result = fid_featuresdict_to_statistics(features, inception.POOL)
        result = (result["mu"], result["sigma"])
    distributed.barrier()
    return result


def timed(fn, *args):
    distributed.barrier()
    start = time.perf_counter()
    out = fn(*args)
    distributed.barrier()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="number of images")
    parser.add_argument(
        "--size", type=int, default=256, help="image side in pixels (Inception resizes to 299)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per Inception forward and process")
    parser.add_argument("--inception-weights", default=None, help="InceptionV3 weights file")
    args = parser.parse_args()
    # torch-fidelity's DataLoader asks for 4 workers on any machine; torch warns about it on small ones
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    distributed.init()
    try:
        run(args)
    finally:
        distributed.shutdown()


def run(args):
    from torch_fidelity.utils import create_feature_extractor

    work = distributed.broadcast_object(
        tempfile.mkdtemp(prefix="fid-throughput-") if distributed.is_main() else None
    )
    weights = args.inception_weights or inception.weights_path(None)
    if weights is None:  # no internet here: an untrained network runs at the same speed
        weights = os.path.join(work, "inception-untrained.pth")
        with distributed.main_first():
            if distributed.is_main():
                net = inception.calibrate_(inception.untrained(), make_images(2, 64))
                checkpoint.write(net.state_dict(), weights)
    extractor = inception.build(weights, distributed.device())
    fidelity_extractor = create_feature_extractor(
        "inception-v3-compat",
        [inception.POOL],
        cuda=torch.cuda.is_available(),
        feature_extractor_weights_path=weights,
        verbose=False,
    )
    batch = make_images(args.images, args.size)
    folder = os.path.join(work, "png")
    os.makedirs(folder, exist_ok=True)

    ours, ours_s = timed(in_memory, extractor, batch, args.batch_size)
    theirs, theirs_s = timed(round_trip, fidelity_extractor, batch, args.batch_size, folder)
    if distributed.is_main():
        png_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
        print(
            f"{args.images} images of {args.size}x{args.size} ({png_mb:.1f} MiB as PNG), "
            f"batch {args.batch_size}, {distributed.world()} process(es) x {torch.get_num_threads()} "
            f"thread(s), device {distributed.device()}"
        )
        print(f"in memory:   {ours_s:7.2f} s  {args.images / ours_s:7.2f} img/s")
        print(f"PNG round trip: {theirs_s:4.2f} s  {args.images / theirs_s:7.2f} img/s")
        print(f"ratio (in memory / round trip, images per second): {theirs_s / ours_s:.2f}x")
        print(
            f"same statistics: max |mu difference| {np.abs(ours[0] - theirs[0]).max():.2e}, "
            f"max |sigma difference| {np.abs(ours[1] - theirs[1]).max():.2e}"
        )
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
