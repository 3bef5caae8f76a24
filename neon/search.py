"""Search strategies for the sweep (`sweep.search`): which (snapshot, w, cfg) points to score.

A search is a generator. It yields the points it wants scored as tuples (snapshot, w, cfg, n), n the
number of samples, and is sent back each one's FID (a float, lower is better; send inf for a point
that could not be scored). Its return value is the choice (`Choice`). It never scores anything
itself: `neon.sweep.run` does that (and caches each score as one line of results.jsonl), and
`drive(steps, evaluate)` runs a search against a plain function, as the tests do.

A search proposes only points of the grid (and, with `refine`, their refinement neighbours): every
snapshot × the w values × the cfg values, where w = 0 is the base (snapshot `BASE`), one point per cfg
whatever the snapshot. So every grid point a search scores at n = num is a point the grid would score,
and a later grid reuses it.

The strategies, all run first at n = `screen` on every snapshot:

* `grid`: every point, in the grid's order.
* `brent`: per snapshot and cfg, a line search over w: the grid's w values plus 0, bounded by the
  smallest and largest of them, resolved to the grid's spacing.
* `coordinate`: per snapshot, a search of the (w, cfg) grid from (0, the sampler's own cfg, else
  the middle one): line searches through the best cell so far along w, along cfg and along the two
  diagonals of the grid in turn, until none of the four moves it (FID valleys over (w, cfg) run
  diagonally: a higher w wants a higher cfg); then a step to the cell where a quadratic in (w, cfg),
  fitted by least squares to the 12 scored cells nearest to the best, is lowest. While that step
  improves, the line searches resume from it. With one cfg it is `brent`.

Every strategy also finds the base's own best cfg: a line search over cfg at w = 0 (points a grid or
`brent` has already scored cost nothing).

Successive halving on the number of samples: when `screen < num`, the best `keep` fraction of the
screened points (at least 2) is scored again at n = num, and so is the base at its best screened cfg
(with more than one cfg).
With `screen == num` there is one round.

Refinement (`refine`, the authors' ±0.1 stage of VAR-d16, xAR-B and xAR-L): at n = num, the
neighbours of the best point, w ± refine and cfg ± refine (8 points; 2 without cfg), and the base at
its best cfg ± refine, are scored like any other point. Refined values are rounded to 10 decimals; a w
that reaches 0 or changes sign, and a cfg <= 0, are skipped (the authors skip non-positive values).
The choice is the lowest point at n = num; `base_cfg` the cfg of the lowest base point at n = num.

The line search is a discrete form of Brent's method over the indices of a sorted list of values:
from the start index it keeps the best index x with its nearest evaluated neighbours (a, b) as the
bracket, proposes the vertex of the parabola through (a, x, b) when all three are evaluated (the
unevaluated index nearest to it on the side it lies), else a golden-section step into the larger
unevaluated gap, and after a parabolic step that did not improve, a golden step. It stops when both
neighbours of x are evaluated (or are outside the list): on a unimodal curve that x is the minimum
of the grid, found in O(log m) evaluations of the m values.
"""

import itertools
import math
from collections.abc import Callable, Generator, Sequence

import numpy as np

from neon.errors import NeonError

BASE = "base"  # the snapshot of every w = 0 point: the base does not depend on the snapshot
STRATEGIES = ("grid", "brent", "coordinate")
GOLDEN = (3 - math.sqrt(5)) / 2  # 0.382: the golden-section fraction
DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1))  # coordinate search: w, cfg and the diagonals, in grid steps
MAX_STEPS = 100  # coordinate search: quadratic steps at most
QUADRATIC_POINTS = 12  # coordinate search: the scored cells a quadratic is fitted to

MAX_POINTS = 10_000  # a w grid holds at most this many values
MAX_W = 1e6  # |w| at most: (1 + w) θ − w θ_s loses float32's precision long before it overflows
Point = tuple  # (snapshot, w, cfg)
Choice = dict  # {'snapshot', 'w', 'cfg', 'fid', 'n', 'base_cfg', 'evidence': [{'n', 'points': [[...], ...]}]}
BOWLS = ((1.0, 1.0, 0.0), (1.0, 4.0, 0.9), (4.0, 1.0, -0.9), (1.0, 1.0, 1.6))
"""`max_images`: the convex FID surfaces a search is costed on, (a, b, r) of
a·dw² + b·dc² + r·dw·dc in units of the grid's spans (round, long along w, along cfg, diagonal)."""


def grid(spec) -> list[float]:
    """The w values of a spec: '0:2:0.25' → [0, 0.25, …, 2]; '0,0.5' or [0, 0.5] as given. At most
    MAX_POINTS values (counted before any is made), each with |w| <= MAX_W."""
    bad = f"bad w grid {spec!r}"
    try:
        if isinstance(spec, (int, float)):
            values = [float(spec)]
        elif isinstance(spec, (list, tuple)):
            values = [float(v) for v in spec]
        elif ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
            if (
                not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step))
                or step <= 0
                or stop < start
            ):
                raise ValueError
            # before counting: a huge range would read as too many points
            if (max(abs(start), abs(stop)) > MAX_W):
                raise NeonError(f"{bad}: |w| must be at most {MAX_W:g}")
            count = (stop - start) / step + 1
            if not count <= MAX_POINTS:
                raise NeonError(f"{bad}: {count:.3g} points, more than {MAX_POINTS}")
            values = [round(start + i * step, 10) for i in range(int(round(count)))
                      if start + i * step <= stop + 1e-9]
        else:
            values = [float(v) for v in spec.split(",")]
    except (ValueError, TypeError):
        raise NeonError(f"{bad}: use start:stop:step, a,b,c or a list") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise NeonError(f"{bad}: values must be finite")
    if len(values) > MAX_POINTS:
        raise NeonError(f"{bad}: {len(values)} points, more than {MAX_POINTS}")
    if max(abs(v) for v in values) > MAX_W:
        raise NeonError(f"{bad}: |w| must be at most {MAX_W:g}")
    return values


def point(snapshot: str, w: float, cfg) -> Point:
    """The grid point of (snapshot, w, cfg): w = 0 is the base whatever the snapshot."""
    return (BASE, 0.0, cfg) if w == 0 else (snapshot, float(w), cfg)


def grid_points(snapshots: Sequence[str], ws: Sequence[float], cfgs: Sequence) -> list[Point]:
    """Every point of the grid: the base at each cfg, then per snapshot, per w (w = 0 left out: it
    is the base), per cfg."""
    return [point(BASE, 0.0, c) for c in cfgs] + [point(s, w, c) for s in snapshots for w in ws if w != 0
                                                  for c in cfgs]


def refined(values: Sequence, step: float | None) -> list:
    """`values` with their refinement neighbours v ± step (module docstring), sorted; [None] stays."""
    if not step or None in values:
        return list(values)
    return sorted(set(map(float, values)) | {v for x in values for v in _neighbours(float(x), step, x == 0)})


def _neighbours(x: float, step: float, is_w: bool) -> list[float]:
    """x ± step, rounded; without 0, sign changes of a w, and cfg values <= 0."""
    out = [round(x + d, 10) for d in (-step, step)]
    return [v for v in out if (v != 0 and v * x > 0 if is_w else v > 0)]


def search(
    strategy: str,
    snapshots: Sequence[str],
    ws: Sequence[float],
    cfgs: Sequence,
    num: int,
    screen: int,
    keep: float,
    start_cfg=None,
    refine: float | None = None,
) -> Generator[tuple, float, Choice]:
    """Generator: choose a point of the grid `snapshots` × `ws` × `cfgs` (cfgs [None] when cfg is not
    searched) by `strategy` with successive halving from n = `screen` to n = `num`, then `refine`
    (module docstring). Yields (snapshot, w, cfg, n); receives the FID of each; returns the `Choice`.
    `start_cfg`: where the coordinate search starts (the sampler's own cfg, when it is one of `cfgs`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}")
    scores = _Scores()
    line_ws = sorted(set(map(float, ws)) | {0.0})
    if strategy == "grid":
        for p in grid_points(snapshots, ws, cfgs):
            yield from scores.ask(p, screen)
    elif strategy == "brent":
        for s in snapshots:
            for c in cfgs:
                yield from _line(
                    line_ws, line_ws.index(0.0), lambda i: scores.ask(point(s, line_ws[i], c), screen)
                )
    else:
        c0 = start_cfg if start_cfg in cfgs else sorted(cfgs, key=_order)[(len(cfgs) - 1) // 2]
        for s in snapshots:
            yield from _coordinate(s, line_ws, sorted(cfgs, key=_order), c0, screen, scores)
    ordered = sorted(cfgs, key=_order)
    if None not in cfgs:  # the base's own best cfg: the line over cfg at w = 0
        start = ordered.index(start_cfg) if start_cfg in ordered else (len(ordered) - 1) // 2
        yield from _line(ordered, start, lambda i: scores.ask(point(BASE, 0.0, ordered[i]), screen))
    if screen < num:
        screened = sorted(scores.at(screen), key=lambda item: item[1])
        count = min(len(screened), max(2, math.ceil(keep * len(screened))))
        # the base at its best screened cfg, for the final report's base side (one cfg: the chosen one's)
        base = [min((item for item in screened if item[0][0] == BASE), key=lambda item: item[1])]
        for p, _ in screened[:count] + (base if len(cfgs) > 1 else []):
            yield from scores.ask(p, num)
    if refine:
        (s, w, c), _ = min(scores.at(num), key=lambda item: item[1])
        near_w = [w] + (_neighbours(w, refine, True) if s != BASE else [])
        near_c = [c] + (_neighbours(c, refine, False) if c is not None else [])
        for p in [point(s, a, b) for a in near_w for b in near_c][1:]:
            yield from scores.ask(p, num)
        base = min(
            ((p, f) for p, f in scores.at(num) if p[0] == BASE), key=lambda item: item[1], default=None
        )
        for b in (
            _neighbours(base[0][2], refine, False) if base is not None and base[0][2] is not None else []
        ):
            yield from scores.ask(point(BASE, 0.0, b), num)
    best, fid = min(scores.at(num), key=lambda item: item[1])
    base = min(((p, f) for p, f in scores.at(num) if p[0] == BASE), key=lambda item: item[1], default=None)
    return {"snapshot": best[0], "w": best[1], "cfg": best[2], "fid": fid, "n": num,
            "base_cfg": base[0][2] if base else best[2], "evidence": scores.evidence()}


def max_images(strategy: str, snapshots: int, ws: Sequence[float], cfgs: Sequence, num: int, screen: int,
               keep: float, refine: float | None = None) -> int:
    """The most images a selection by `strategy` generates over `snapshots` snapshots of the grid
    `ws` × `cfgs`, on every convex FID surface of BOWLS with its minimum at any cell of the grid (the
    model the searches are built on; a noisy surface can cost more, never more than the grid plus the
    refinement). `grid`: exact. What `neon sweep --dry-run` prints, and `neon plan` will use."""
    ws = [float(w) for w in ws]
    cfgs = list(cfgs) or [None]
    worst_base, worst_snapshot = 0, 0
    for f in _bowls(ws, cfgs):
        steps = search(strategy, ["s"], ws, cfgs, 1, 1, 1.0)
        asked = []
        drive(steps, lambda s, w, c, n: asked.append(s) or f(w, c))
        worst_base = max(worst_base, asked.count(BASE))
        worst_snapshot = max(worst_snapshot, len(asked) - asked.count(BASE))
    screened = worst_base + snapshots * worst_snapshot
    again = min(screened, max(2, math.ceil(keep * screened)) + (len(cfgs) > 1)) if screen < num else 0
    extra = (3 * (3 if None not in cfgs else 1) - 1 + (2 if None not in cfgs else 0)) if refine else 0
    return screened * screen + (again + extra) * num


def _bowls(ws: list[float], cfgs: list):
    """FID surfaces f(w, cfg) of BOWLS, one per shape and grid cell of their minimum."""
    line = sorted(set(ws) | {0.0})
    cs = [c for c in cfgs if c is not None] or [0.0]
    span_w, span_c = (max(line) - min(line)) or 1.0, (max(cs) - min(cs)) or 1.0
    for a, b, r in BOWLS:
        for w0 in line:
            for c0 in cs:
                def f(w, c, w0=w0, c0=c0, a=a, b=b, r=r):
                    dw, dc = (w - w0) / span_w, ((c if c is not None else 0.0) - c0) / span_c
                    return a * dw * dw + b * dc * dc + r * dw * dc
                yield f


def drive(steps: Generator, evaluate: Callable[[str, float, object, int], float]):
    """Run the search `steps` with `evaluate(snapshot, w, cfg, n) -> fid`; its return value."""
    value = None
    try:
        while True:
            value = evaluate(*steps.send(value))
    except StopIteration as done:
        return done.value


class _Scores:
    """The scores a search has received, by (point, n), in the order asked."""

    def __init__(self):
        self.seen: dict[tuple, float] = {}

    def ask(self, p: Point, n: int):
        """Generator: the FID of point p at n samples (yields the request the first time only)."""
        if (p, n) not in self.seen:
            fid = yield (*p, n)
            self.seen[(p, n)] = math.inf if fid is None or math.isnan(fid) else float(fid)
        return self.seen[(p, n)]

    def at(self, n: int) -> list[tuple[Point, float]]:
        return [(p, fid) for (p, m), fid in self.seen.items() if m == n]

    def evidence(self) -> list[dict]:
        ns = sorted({m for _, m in self.seen})
        return [{"n": n, "points": [[*p, fid] for p, fid in self.at(n)]} for n in ns]


def _coordinate(snapshot, ws, cfgs, c0, n, scores):
    """Generator: the (w, cfg) search of one snapshot (module docstring); returns (w, cfg)."""
    def key(c):
        return point(snapshot, ws[c[0]], cfgs[c[1]]), n

    def value(c):
        return scores.ask(*key(c))

    cell = (ws.index(0.0), cfgs.index(c0))
    for _ in range(MAX_STEPS):
        cell = yield from _pattern(ws, cfgs, cell, value)
        known = {c: scores.seen[key(c)] for c in itertools.product(range(len(ws)), range(len(cfgs)))
                 if key(c) in scores.seen}
        step = _quadratic(ws, cfgs, known, cell)
        if step is None or step in known or (yield from value(step)) >= known[cell]:
            break
        cell = step
    return ws[cell[0]], cfgs[cell[1]]


def _pattern(ws, cfgs, cell, value):
    """Generator: line searches through `cell` (w index, cfg index) along each of DIRECTIONS in
    turn, each moving it to the best of its line, until none of the four moves it; returns it."""
    still = 0
    for turn in itertools.count():
        dw, dc = DIRECTIONS[turn % len(DIRECTIONS)]
        span = range(-len(ws) - len(cfgs), len(ws) + len(cfgs))
        cells = [(cell[0] + k * dw, cell[1] + k * dc) for k in span
                 if 0 <= cell[0] + k * dw < len(ws) and 0 <= cell[1] + k * dc < len(cfgs)]
        # the parabola's positions: the values along an axis, the grid steps along a diagonal
        xs = ([ws[i] for i, _ in cells] if dc == 0 else [cfgs[j] for _, j in cells] if dw == 0
              else list(range(len(cells))))
        j = yield from _line(xs, cells.index(cell), lambda i: value(cells[i]))
        still = still + 1 if cells[j] == cell else 1
        cell = cells[j]
        if still == len(DIRECTIONS):
            return cell


def _quadratic(ws, cfgs, known: dict, best: tuple) -> tuple | None:
    """The grid cell (w index, cfg index) where the quadratic in (w, cfg) fitted by least squares to
    the QUADRATIC_POINTS scored cells nearest to `best` is lowest; None when it has no minimum."""
    if len(cfgs) < 2 or None in cfgs:
        return None
    cells = sorted((c for c in known if math.isfinite(known[c])),
                   key=lambda c: (c[0] - best[0]) ** 2 + (c[1] - best[1]) ** 2)[:QUADRATIC_POINTS]
    if len(cells) < 6:
        return None
    w = np.array([ws[i] for i, _ in cells])
    c = np.array([cfgs[j] for _, j in cells], dtype=float)
    design = np.stack([np.ones_like(w), w, c, w * w, w * c, c * c], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.array([known[cell] for cell in cells]), rcond=None)
    hessian = np.array([[2 * coef[3], coef[4]], [coef[4], 2 * coef[5]]])
    if np.linalg.matrix_rank(design) < 6 or np.any(np.linalg.eigvalsh(hessian) <= 0):
        return None
    grid_w, grid_c = np.meshgrid(np.array(ws, dtype=float), np.array(cfgs, dtype=float), indexing="ij")
    predicted = (
        np.stack([np.ones_like(grid_w), grid_w, grid_c, grid_w**2, grid_w * grid_c, grid_c**2], -1) @ coef
    )
    return tuple(int(i) for i in np.unravel_index(np.argmin(predicted), predicted.shape))


def _line(xs: list[float], start: int, value: Callable):
    """Generator: the index of a minimum over the positions xs (increasing floats) of value(i), a
    generator returning the float at index i: the discrete Brent search of the module docstring,
    from index `start`."""
    known: dict[int, float] = {}

    def at(i):
        if i not in known:
            known[i] = yield from value(i)
        return known[i]

    yield from at(start)
    force_golden = False
    while True:
        x = min(known, key=lambda i: (known[i], i))
        a = max((i for i in known if i < x), default=-1)  # -1 and len(xs): no evaluated point on that side
        b = min((i for i in known if i > x), default=len(xs))
        if b - a <= 2:
            return x
        u = None if force_golden else _parabolic(xs, known, a, x, b)
        parabolic = u is not None
        if u is None:
            u = _golden(a, x, b)
        best = known[x]
        yield from at(u)
        force_golden = parabolic and known[u] >= best


def _parabolic(xs, known, a, x, b) -> int | None:
    """The unevaluated index nearest to the vertex of the parabola through a, x, b (in the values
    xs), on the vertex's side of x; None without three points or a vertex off both gaps."""
    if a < 0 or b >= len(xs) or any(math.isinf(known[i]) for i in (a, x, b)):
        return None
    (xa, fa), (xx, fx), (xb, fb) = ((xs[i], known[i]) for i in (a, x, b))
    denominator = (xx - xa) * (fx - fb) - (xx - xb) * (fx - fa)
    if denominator >= 0:  # flat or not convex: no minimum inside
        return None
    vertex = xx - 0.5 * ((xx - xa) ** 2 * (fx - fb) - (xx - xb) ** 2 * (fx - fa)) / denominator
    side = range(x + 1, b) if vertex > xx else range(a + 1, x) if vertex < xx else range(0)
    if not side:
        return None
    return min(side, key=lambda i: abs(xs[i] - vertex))


def _golden(a: int, x: int, b: int) -> int:
    """A golden-section step from x into the larger of the unevaluated gaps (a, x) and (x, b)."""
    if b - x >= x - a:
        return min(b - 1, x + max(1, round(GOLDEN * (b - x))))
    return max(a + 1, x - max(1, round(GOLDEN * (x - a))))


def _order(value) -> float:
    return -math.inf if value is None else float(value)
