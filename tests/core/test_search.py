"""The search strategies (neon.search) against known curves, without models: they choose the grid's
optimum with a fraction of its evaluations, halve on n, and replay a cache to resume."""

import math

import pytest

from neon import search

WS = search.grid("-2:2:0.25")  # the toy recipes' grid: 17 values
CFGS = [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6]  # VAR-d16's 14 guidance scales


def _run(strategy, f, snapshots=("s1",), ws=WS, cfgs=(None,), num=1000, screen=None, keep=0.25, start=None):
    """(choice, evaluations) of a search with evaluate = f, recording every call."""
    calls = []

    def evaluate(snapshot, w, cfg, n):
        calls.append((snapshot, w, cfg, n))
        return f(snapshot, w, cfg, n)

    steps = search.search(strategy, list(snapshots), list(ws), list(cfgs), num, screen or num, keep, start)
    return search.drive(steps, evaluate), calls


def _bowl(w_star, offsets=None):
    """A convex curve in w with its minimum at w_star + the snapshot's offset; the base (w = 0) is
    the same point for every snapshot."""
    offsets = offsets or {}

    def f(snapshot, w, cfg, n):
        shift = offsets.get(snapshot, 0.0) if w != 0 else 0.0
        return 1.0 + (w - w_star) ** 2 + 0.1 * abs(w - w_star) ** 3 + shift + 5.0 / n

    return f


@pytest.mark.parametrize("w_star", [-1.9, -0.8, 0.1, 0.37, 0.6, 1.3, 2.5])
def test_brent_and_grid_choose_the_same_w_on_a_convex_curve(w_star):
    f = _bowl(w_star, {"s2": -0.05})
    grid, grid_calls = _run("grid", f, snapshots=("s1", "s2"))
    brent, brent_calls = _run("brent", f, snapshots=("s1", "s2"))
    assert (brent["snapshot"], brent["w"]) == (grid["snapshot"], grid["w"])
    assert brent["fid"] == grid["fid"] == min(f(s, w, None, 1000) for s in ("s1", "s2") for w in WS)
    assert len(grid_calls) == 1 + 2 * 16 and len(brent_calls) <= 2 * 8  # the base is shared
    assert len(set(brent_calls)) == len(brent_calls)  # never the same point twice


def test_coordinate_and_grid_choose_the_same_point_on_a_convex_surface_with_a_diagonal_valley():
    # FID over (w, cfg) of the paper's VAR heat map: a valley where a higher w wants a higher cfg
    def f(snapshot, w, cfg, n):
        u, v = w - 0.9, cfg - 2.3
        return 2.0 + u * u + 3.0 * (v - 0.8 * u) ** 2

    grid, grid_calls = _run("grid", f, cfgs=CFGS, start=1.4)
    coordinate, calls = _run("coordinate", f, cfgs=CFGS, start=1.4)
    assert (coordinate["w"], coordinate["cfg"]) == (grid["w"], grid["cfg"]) and coordinate["fid"] == grid[
        "fid"
    ]
    assert len(grid_calls) == 17 * 14 and len(calls) <= 17 * 14 / 5


def test_successive_halving_rescores_the_best_fraction_and_chooses_at_the_full_n():
    # at n = 250 the curve's noise puts w = 1.0 first; at n = 1000 w = 0.75 wins
    def f(snapshot, w, cfg, n):
        noisy = {1.0: -0.05} if n < 1000 else {}
        return (w - 0.8) ** 2 + noisy.get(w, 0.0)

    grid, grid_calls = _run("grid", f, screen=250, keep=0.25)
    screened = [c for c in grid_calls if c[3] == 250]
    full = [c for c in grid_calls if c[3] == 1000]
    assert len(screened) == 17 and len(full) == math.ceil(0.25 * 17)
    assert {c[1] for c in full} == {1.0, 0.75, 0.5, 1.25, 0.25}  # the five best at n = 250, best first
    assert full[0][1] == 1.0 and (grid["w"], grid["n"]) == (0.75, 1000)
    brent, calls = _run("brent", f, screen=250, keep=0.25)
    assert brent["w"] == 0.75 and sum(c[3] == 1000 for c in calls) == 2  # at least two are re-scored
    assert [e["n"] for e in brent["evidence"]] == [250, 1000]
    assert sum(c[3] for c in calls) <= 17 * 1000 / 5  # a fifth of the plain grid's images


def test_a_search_replays_its_cache_and_resumes_where_it_stopped():
    f = _bowl(0.6, {"s2": -0.1})
    whole, calls = _run("brent", f, snapshots=("s1", "s2"), screen=250)
    cache = {}

    def interrupted(snapshot, w, cfg, n):
        if len(cache) == 5:
            raise KeyboardInterrupt
        cache[(snapshot, w, cfg, n)] = f(snapshot, w, cfg, n)
        return cache[(snapshot, w, cfg, n)]

    with pytest.raises(KeyboardInterrupt):
        search.drive(search.search("brent", ["s1", "s2"], WS, [None], 1000, 250, 0.25), interrupted)
    new = []

    def resumed(snapshot, w, cfg, n):
        if (snapshot, w, cfg, n) not in cache:
            new.append((snapshot, w, cfg, n))
            cache[(snapshot, w, cfg, n)] = f(snapshot, w, cfg, n)
        return cache[(snapshot, w, cfg, n)]

    again = search.drive(search.search("brent", ["s1", "s2"], WS, [None], 1000, 250, 0.25), resumed)
    assert again == whole and new == calls[5:]


def test_unscored_points_count_as_infinite_and_single_values_need_one_evaluation():
    def f(snapshot, w, cfg, n):
        return None if w == 0.25 else float("nan") if w == 0.5 else (w - 0.4) ** 2

    choice, calls = _run("brent", f)
    assert choice["w"] == 0.75 and choice["fid"] == pytest.approx(0.35**2)
    one, calls = _run("coordinate", lambda s, w, c, n: 1.0, ws=[0.0], cfgs=[2.0])
    assert calls == [("base", 0.0, 2.0, 1000)] and one["snapshot"] == "base"


def test_the_grid_order_and_the_base_point():
    assert search.grid_points(["a", "b"], [0.0, 1.0], [None]) == [
        ("base", 0.0, None),
        ("a", 1.0, None),
        ("b", 1.0, None),
    ]
    assert search.point("a", 0.0, 1.5) == ("base", 0.0, 1.5)
    with pytest.raises(ValueError, match="unknown search strategy"):
        next(search.search("random", ["a"], [1.0], [None], 10, 10, 0.5))


def test_refinement_without_cfg_when_the_base_was_not_rescored():
    """w alone, halving keeps two points that are not the base: the refinement looks around the best w and
    leaves the base's cfg alone (it has none)."""

    def f(snapshot, w, cfg, n):
        return (w - 0.83) ** 2

    steps = search.search("brent", ["s"], search.grid("-2:2:0.25"), [None], 1000, 250, 0.1, refine=0.1)
    asked, value = [], None
    try:
        while True:
            p = steps.send(value)
            asked.append(p)
            value = f(*p)
    except StopIteration as done:
        choice = done.value
    assert choice["w"] == 0.85 and choice["base_cfg"] is None  # off the grid: 0.75 refined by +0.1
    assert {p[1] for p in asked if p[3] == 1000} >= {0.75, 0.65, 0.85}
