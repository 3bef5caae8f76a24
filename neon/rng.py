"""Per-sample random numbers without per-sample Python loops.

`normal(seeds, shape)` returns standard normal draws where row i depends only on `seeds[i]` (a
counter-based generator: SplitMix64 over (seed, element index), then Box-Muller). A sample's noise
is therefore the same whatever its batch, rank or world size, which is what makes synthetic sets
bitwise identical across world sizes and gives common random numbers across a sweep. It costs one
vectorized pass instead of one `torch.Generator` per sample (about 12 µs each on CPU).
"""

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, which is exactly the uint64 arithmetic SplitMix64 needs.
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def derive(*ints: int) -> int:
    """A 63-bit seed from a tuple of ints (negative ones allowed): SplitMix64 chained over them, the same
    in every process and Python version. The one seed derivation of the project (a fine-tune step's
    generator from (seed, step, shard), an epoch's data order from (seed, epoch, -1))."""
    state = torch.tensor([_signed(len(ints))], dtype=torch.int64)
    for value in ints:
        state = _splitmix64(state ^ _signed(value))
    return int(state.item()) & ((1 << 63) - 1)


def uniform(seeds: torch.Tensor, count: int, stream: int = 0) -> torch.Tensor:
    """float64 [B, count] uniform in (0, 1) on the seeds' device; row i depends only on (seeds[i], stream)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1, 1)
    index = torch.arange(count, dtype=torch.int64, device=seeds.device).reshape(1, -1)
    state = _splitmix64(_splitmix64(seeds * _GOLDEN + stream) + index)
    mantissa = _shr(state, 11).to(torch.float64)  # 53 random bits
    return (mantissa + 0.5) / float(1 << 53)


def normal(seeds: torch.Tensor, shape: tuple[int, ...], stream: int = 0,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws of shape [B, *shape]; row i depends only on (seeds[i], stream).
    Different `stream` values give independent draws for the same seeds."""
    count = 1
    for size in shape:
        count *= size
    half = (count + 1) // 2
    u = uniform(seeds, 2 * half, stream)
    radius = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    angle = (2.0 * torch.pi) * u[:, half:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :count]
    return z.reshape(-1, *shape).to(dtype)
