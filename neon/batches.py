"""The fine-tune's data stream: the order in which it visits S, and the input pipeline that reads and
prepares the batches of the next steps while a step runs (`neon.finetune.run`).

The order is a permutation of S per epoch, seeded by (seed, epoch); each micro-batch's generator is
derived from (seed, step, shard) (`neon.rng.derive`), so the batches and every draw are the same for any
number of workers, processes × micro-steps, and resumed or not.
"""

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from neon import family as neon_family
from neon import rng


class DataOrder:
    """The data stream: epoch e visits S in the order randperm(N) seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(rng.derive(self.seed, epoch, -1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm

    def take(self, position: int, count: int) -> torch.Tensor:
        """Indices of stream positions [position, position + count)."""
        parts = []
        while count > 0:
            epoch, offset = divmod(position, self.n)
            chunk = self._permutation(epoch)[offset:offset + count]
            parts.append(chunk)
            position, count = position + len(chunk), count - len(chunk)
        return torch.cat(parts)


class Pipeline:
    """The input pipeline: the micro-batches of this rank for a step, each (samples, labels,
    generator), read and prepared (the family's optional `prepare`, drawing first from the step's
    generator, which then goes to `loss`) on `conf.workers` threads, up to that many steps ahead, in
    pinned memory on CUDA. The main thread takes the data order (`DataOrder` is not shared), so
    the batches and every draw are those of a run without the pipeline."""

    def __init__(self, family, data, order: DataOrder, conf, rank: int, micro: int, device):
        self.data, self.order, self.conf = data, order, conf
        self.rank, self.micro, self.pin = rank, micro, device.type == "cuda"
        self.prepare = neon_family.member(family, "prepare")
        self.pool = ThreadPoolExecutor(conf.workers, "neon-input") if conf.workers else None
        self.ahead: dict[int, Future] = {}

    def take(self, position: int) -> list[tuple]:
        """The micro-batches of the step starting at stream position `position`; the next steps'
        are started."""
        if self.pool is None:
            return self._load(position, self.order.take(position, self.conf.batch_size))
        for k in range(self.conf.workers + 1):
            start = position + k * self.conf.batch_size
            if start not in self.ahead and start < self.conf.total_images:
                batch = self.order.take(start, self.conf.batch_size)
                self.ahead[start] = self.pool.submit(self._load, start, batch)
        return self.ahead.pop(position).result()

    def _load(self, position: int, batch: torch.Tensor) -> list[tuple]:
        step, conf, out = position // self.conf.batch_size, self.conf, []
        for m in range(conf.accumulate):
            shard = self.rank * conf.accumulate + m
            indices = batch[shard * self.micro:(shard + 1) * self.micro]
            generator = torch.Generator().manual_seed(rng.derive(conf.seed, step, shard))
            samples, labels = self.data.read(indices), self.data.labels[indices]
            if self.prepare is not None:
                samples = self.prepare(samples, generator)
            if self.pin:
                samples, labels = samples.pin_memory(), labels.pin_memory()
            out.append((samples, labels, generator))
        return out

    def close(self) -> None:
        if self.pool is not None:
            for future in self.ahead.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.ahead.clear()
