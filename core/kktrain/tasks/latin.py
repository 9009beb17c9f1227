"""Latin-square completion, the default task: fill the hidden cells of an n x n Latin square.

Vocabulary (35 tokens, one for every size and mode)::

    0 PAD     outside the n x n grid (a batch is padded to its largest n)
    1 EMPTY   a hidden cell: the model predicts its symbol
    2..34     the values -16..16 (token = value + 18)

Modes name the symbols of an n x n grid: STANDARD 1..n, ZERO_INCLUSIVE 0..n-1, NEGATIVE the
symmetric range -(n//2)..n//2, without 0 when n is even (n=5: -2..2, n=4: -2,-1,1,2). Values
-16..-9 are part of the layout but no mode uses them.

The generator. A square is one of a fixed pool of POOL_SIZE squares per n, put through a random
isotopism (row, column and symbol permutations, the ``augment`` option) and then (n+1)//2
Jacobson–Matthews moves. Why this is random enough: the uniform law on Latin squares is
stationary for the Jacobson–Matthews chain and for random isotopisms alike, and the pool comes
from long chains (n**2 moves, about n**3 steps, from isotopes of the cyclic square), so every
sample is as uniform as the chain is mixed; the per-sample moves carry samples out of the pool's
isotopy classes, so they are not n!^3 relabellings of 64 squares. The tests check the frequencies
of the isotopy classes of orders 4 and 5 against their exact uniform values. Why not a full chain
per sample: a move costs about n chain steps, and n**3 steps per puzzle would make data the
bottleneck. The pool is made once per process from a constant seed (the same in every worker);
everything else comes from ``key.seed`` through counter-based hashing, so a puzzle depends on its
key alone: not on the batch it lands in, the worker count or the order of generation. All of it
is numpy over whole batches.

Batches are dicts of tensors: ``tokens`` (B, N, N) the puzzle, ``target`` (B, N, N) the solution,
``size`` (B,) n and ``mode`` (B,) the mode index, N being the largest n in the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kktrain.task import SampleKey

# ------------------------------------------------------------------------------ vocabulary

PAD, EMPTY = 0, 1
VALUE_MIN, VALUE_MAX = -16, 16
VALUE_OFFSET = EMPTY + 1 - VALUE_MIN  # token = value + 18
VOCAB_SIZE = VALUE_MAX + VALUE_OFFSET + 1  # 35
MIN_SIZE, MAX_SIZE = 3, 16
BATCH_KEYS = ("tokens", "target", "size", "mode")


class Mode(IntEnum):
    """How the n symbols of a grid are written."""

    STANDARD = 0  # 1..n
    ZERO_INCLUSIVE = 1  # 0..n-1
    NEGATIVE = 2  # -(n//2)..n//2, skipping 0 for even n


ModeName = Literal["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]


def symbol_values(n: int, mode: Mode | int) -> list[int]:
    """The n symbol values of an n x n grid in ``mode``, in symbol-index order."""
    mode = Mode(mode)
    if mode is Mode.STANDARD:
        return list(range(1, n + 1))
    if mode is Mode.ZERO_INCLUSIVE:
        return list(range(n))
    half = n // 2
    return [v for v in range(-half, half + 1) if n % 2 or v != 0]


def _symbol_token_table() -> np.ndarray:
    """``table[mode, n, i]``: the token of symbol index i of an n x n grid (PAD for i >= n)."""
    table = np.full((len(Mode), MAX_SIZE + 1, MAX_SIZE), PAD, np.int64)
    for mode in Mode:
        for n in range(MIN_SIZE, MAX_SIZE + 1):
            table[mode, n, :n] = np.array(symbol_values(n, mode)) + VALUE_OFFSET
    return table


SYMBOL_TOKENS = _symbol_token_table()


@functools.cache
def allowed_tokens() -> torch.Tensor:
    """``allowed[mode, n, token]``: may a cell of an n x n grid in ``mode`` hold ``token`` (shared: read only)."""
    allowed = torch.zeros(len(Mode), MAX_SIZE + 1, VOCAB_SIZE, dtype=torch.bool)
    for mode in Mode:
        for n in range(MIN_SIZE, MAX_SIZE + 1):
            allowed[mode, n, torch.from_numpy(SYMBOL_TOKENS[mode, n, :n])] = True
    return allowed


# ------------------------------------------------------------------------------ randomness

# A random number is SplitMix64 evaluated at (seed, purpose, counter): any draw of any sample is
# one vectorized hash, and no draw depends on which other samples share the batch. (uint64 array
# arithmetic wraps around silently, as the hash wants.)
_GOLDEN = 0x9E3779B97F4A7C15
_CHOICE, _ISOTOPY, _MIX, _HIDE = 1, 2, 3, 4  # purposes: independent streams per seed
_POOL_SEED = 0x1A7125EED
_VAL_SEED = 0x7A11DA7E
POOL_SIZE = 64
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijective 64-bit hash) of a uint64 array."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream(seeds: np.ndarray, purpose: int) -> np.ndarray:
    """The key of stream ``purpose`` of each seed."""
    return _mix64(seeds + np.uint64(purpose * _GOLDEN % 2**64))


def _bits(stream: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """64 random bits: draw ``counter`` (0, 1, ...) of each stream, broadcast."""
    return _mix64(stream + (counter + np.uint64(1)) * np.uint64(_GOLDEN))


def as_seeds(seeds: Sequence[int] | np.ndarray) -> np.ndarray:
    """Python ints of any sign and size as uint64 seeds (taken modulo 2**64)."""
    if isinstance(seeds, np.ndarray) and seeds.dtype == np.uint64:
        return seeds
    try:  # the common case, non-negative 64-bit ints, without a Python loop
        return np.array(seeds, dtype=np.uint64)
    except OverflowError:
        return np.array([int(s) & _MASK64 for s in seeds], dtype=np.uint64)


def _uniform(seeds: np.ndarray, purpose: int, count: int, start: int = 0) -> np.ndarray:
    """Draws ``start .. start+count-1`` of stream ``purpose`` of each seed: (len(seeds), count) in [0, 1)."""
    counter = np.arange(start, start + count, dtype=np.uint64)
    bits = _bits(_stream(seeds, purpose)[:, None], counter)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _below(u: np.ndarray, m: np.ndarray | int) -> np.ndarray:
    """Uniforms in [0, 1) to integers in [0, m)."""
    return np.minimum((u * m).astype(np.int64), np.asarray(m) - 1)


def _field(bits: np.ndarray, shift: int, m: np.ndarray | int) -> np.ndarray:
    """Bits ``shift .. shift+19`` as an integer in [0, m) (multiply-shift: bias below m / 2**20); m may be an array."""
    return (((bits >> np.uint64(shift)) & np.uint64(0xFFFFF)) * np.asarray(m, np.uint64) >> np.uint64(20)).astype(np.int64)


_DRAW_PAD = np.uint64(1 << 53)  # above every draw of _grid_draws


def _grid_draws(seeds: np.ndarray, purpose: int, sizes: np.ndarray, rows: int, big: int) -> np.ndarray:
    """(B, rows, big): the top 53 bits of draw ``k*n + j`` of each seed at [k, j]; _DRAW_PAD where j >= n.

    Only their order is used (argsort, ranks), which is that of the uniforms ``_uniform`` makes
    from the same bits. A grid padded to ``big`` columns gets the draws an unpadded n-wide one
    would, so sizes can share one array and a sample is the same whatever sizes its batch mixes.
    """
    # Flat (B, rows*big) arrays: numpy broadcasting over a short last axis is slow.
    k = np.repeat(np.arange(rows, dtype=np.uint64), big)
    j = np.tile(np.arange(big, dtype=np.uint64), rows)
    n = sizes.astype(np.uint64)[:, None]
    draws = _bits(_stream(seeds, purpose)[:, None], n * k + j) >> np.uint64(11)
    return np.where(j < n, draws, _DRAW_PAD).reshape(len(seeds), rows, big)


def _inside(sizes: np.ndarray, big: int) -> np.ndarray:
    """(B, N, N): is the cell inside its sample's n x n grid."""
    row, col = np.divmod(np.arange(big * big), big)
    n = sizes[:, None]
    return ((row < n) & (col < n)).reshape(len(sizes), big, big)


# ------------------------------------------------------------------------------ Latin squares
#
# Squares of several sizes share arrays padded to the largest n (B, N, N), with per-sample sizes;
# the cells outside a sample's n x n hold any symbol and mean nothing. Every draw is made at the
# position it has in an unpadded n x n array, so a batch of mixed sizes gives each sample exactly
# what a batch of its size alone would.


def cyclic_square(n: int) -> np.ndarray:
    """The Cayley table of Z_n: symbol (r + c) mod n."""
    return np.add.outer(np.arange(n), np.arange(n)) % n


def _isotope_padded(squares: np.ndarray, sizes: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """:func:`random_isotope` of padded squares (B, N, N) of per-sample ``sizes``."""
    count, big, _ = squares.shape
    rows, cols, syms = np.argsort(_grid_draws(seeds, _ISOTOPY, sizes, 3, big), axis=2).transpose(1, 0, 2)
    offset = np.arange(count)[:, None, None] * big
    moved = squares.reshape(-1).take((offset + rows[:, :, None]) * big + cols[:, None, :])
    return syms.reshape(-1).take(offset + moved)


def random_isotope(squares: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Permute the rows, columns and symbols of each square (B, n, n) at random."""
    return _isotope_padded(squares, np.full(len(squares), squares.shape[-1]), seeds)


_JM_CHUNK = 16  # steps whose random numbers are drawn at once, between compactions of the batch
_JM_TAIL = 20  # at most this many unfinished chains go on one by one in plain Python
_RECTANGLE = np.array([1, -1, -1, 1])[:, None]  # a step's signs at (x, y), (x, y2), (x2, y), (x2, y2)


def _jm_padded(squares: np.ndarray, sizes: np.ndarray, seeds: np.ndarray, moves: np.ndarray) -> np.ndarray:
    """:func:`jacobson_matthews` of padded squares (B, N, N) with per-sample sizes and move counts."""
    count, big, _ = squares.shape
    n2 = big * big
    # The chain lives on the incidence cube x[r, c, s] (1 iff cell (r, c) holds s). A step from a
    # proper square mostly lands on an improper one: one entry -1, every line still summing to 1,
    # so the three lines through the -1 hold two 1s each and every other line exactly one. The
    # cube is kept as three maps of line sums: for a line with one 1 the sum says where the 1 is,
    # and a step changes twelve sums. The two 1s of each line through the -1 are kept apart
    # (``cand_a``, ``cand_b``). So a step is some twenty numpy calls on (live,) arrays and no
    # n-long line is scanned: per-call overhead, not arithmetic, is what a step costs.
    # maps[b, k, x, y]: k=0 Σ_r r·x[r, c=x, s=y] (the row of symbol y in column x), k=1 Σ_c c·x[r=x, c, s=y]
    # (the column of y in row x), k=2 Σ_s s·x[r=x, c=y, s] (the symbol at (x, y): the square).
    pos = np.arange(big)
    # Padding gets symbol N-1, whose sums no chain reads (its symbols are < n <= N-1 when padded).
    squares = np.where(_inside(sizes, big), squares, big - 1)
    maps = np.empty((count, 3, big, big), np.int64)
    maps[:, 2] = squares
    start = (np.arange(count) * (3 * n2))[:, None, None] + squares
    flat = maps.reshape(-1)
    flat[start + pos * big] = pos[:, None]  # map 0 at (c, s): r
    flat[start + (n2 + pos[:, None] * big)] = pos  # map 1 at (r, s): c
    # A step from (r, c, s) to (r2, c2, s2) adds r-r2, c-c2, s-s2 to the sums of map k at
    # (x, y) and (x2, y2) and takes it from (x, y2) and (x2, y): x is c, r, r and y is s, s, c.
    pick_x, pick_y = np.array([1, 0, 0]), np.array([2, 2, 1])
    # The chain is uniform on proper squares observed at its k-th proper visit; stopping at the
    # first proper square after a fixed number of *steps* is biased (measured: 8% instead of 25%
    # of n=4 squares in the Klein class), so moves are counted. Step t of every sample uses draw
    # t of its stream, so a sample's chain does not depend on the batch. Live samples are
    # compacted every _JM_CHUNK steps; in between, a finished one takes steps that change nothing.
    live_idx = np.flatnonzero(moves > 0)
    size = sizes[live_idx].astype(np.int64)
    left = moves[live_idx].astype(np.int64)
    stream = _stream(seeds[live_idx], _MIX)
    improper = np.zeros(len(live_idx), bool)
    bad = np.zeros((3, len(live_idx)), np.int64)  # where the -1 is: r, c, s
    cand_a = cand_b = np.zeros((3, len(live_idx)), np.int64)  # the two 1s of its three lines
    step = 0
    while len(live_idx) > _JM_TAIL:
        width = len(live_idx)
        section = live_idx * (3 * n2) + np.array([0, n2, 2 * n2])[:, None]  # (3, live)
        bits = _bits(stream, np.arange(step, step + _JM_CHUNK, dtype=np.uint64)[:, None])  # (chunk, live)
        m = size.astype(np.uint64)
        # From a proper square: a uniform cell (r, c) and a symbol other than its own.
        r, c, rand_s = _field(bits, 0, m), _field(bits, 20, m), _field(bits, 40, m - np.uint64(1)) + 1
        at_rc = section[2] + r * big + c  # the symbol at (r, c)
        lines = np.array((section[0] + c * big, section[1] + r * big)).transpose(1, 0, 2)  # map 0 at (c, .), 1 at (r, .)
        last = (bits >> np.arange(60, 63, dtype=np.uint64)[:, None, None] & np.uint64(1)).astype(bool)  # (3, chunk, live)
        live = np.ones(width, bool)
        for t in range(_JM_CHUNK):
            # Both continuations, then each chain takes its own: a proper square moves at random;
            # an improper one from its -1 to the first or the last of the two 1s of each line.
            sym = flat.take(at_rc[t])
            s = (sym + rand_s[t]) % size
            others = flat.take(lines[t] + s)  # the row of s in column c, its column in row r
            picks = np.where(last[:, t] == (cand_a > cand_b), cand_a, cand_b)
            move = np.where(
                improper,
                np.array((bad[0], bad[1], bad[2], picks[0], picks[1], picks[2])),
                np.array((r[t], c[t], s, others[0], others[1], sym)),
            ).reshape(2, 3, width)
            first, second = move  # (r, c, s) and (r2, c2, s2)
            xs = move.take(pick_x, axis=1) * big + section  # (2, 3, live)
            at = (xs[:, None] + move.take(pick_y, axis=1)).reshape(4, -1)  # (x, y), (x, y2), (x2, y), (x2, y2)
            sums = flat.take(at)
            cand_a, cand_b = first, sums[3].reshape(3, width)  # map 0 at (c2, s2), map 1 at (r2, s2), map 2 at (r2, c2)
            proper = cand_b[2] == second[2]  # x[r2, c2, s2] was 1 (else it is -1 now)
            flat[at] = sums + np.where(live, first - second, 0).reshape(-1) * _RECTANGLE
            bad = second
            left -= proper
            improper = live > proper
            live = left > 0  # an improper chain has a move left
            if not live.any():
                break
        step += _JM_CHUNK
        live_idx, size, left, stream, improper = (a[live] for a in (live_idx, size, left, stream, improper))
        bad, cand_a, cand_b = bad[:, live], cand_a[:, live], cand_b[:, live]
    # The last few chains: numpy's per-call overhead would be paid for a handful of samples.
    for i, b in enumerate(live_idx.tolist()):
        lines = slice(b * 3 * n2, (b + 1) * 3 * n2)
        sums_of_b = flat[lines].tolist()
        _jm_tail(
            sums_of_b, int(size[i]), big, int(stream[i]), step, int(left[i]), bool(improper[i]),
            (int(bad[0, i]), int(bad[1, i]), int(bad[2, i])), cand_a[:, i].tolist(), cand_b[:, i].tolist(),
        )
        flat[lines] = sums_of_b
    return maps[:, 2].copy()


def _jm_tail(
    sums: list[int], n: int, big: int, stream: int, step: int, left: int, improper: bool,
    bad: tuple[int, int, int], cand_a: list[int], cand_b: list[int],
) -> None:
    """One chain of :func:`_jm_padded` run to its end in plain Python, in place on its maps' flat list."""
    n2 = big * big
    cs, rs, rc = 0, n2, 2 * n2  # the three maps
    r2, c2, s2 = bad
    ra, ca, sa = cand_a
    rb, cb, sb = cand_b
    while left > 0:
        z = (stream + (step + 1) * _GOLDEN) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        step += 1
        if improper:
            r, c, s = r2, c2, s2
            r2 = (ra if ra > rb else rb) if z >> 60 & 1 else (ra if ra < rb else rb)
            c2 = (ca if ca > cb else cb) if z >> 61 & 1 else (ca if ca < cb else cb)
            s2 = (sa if sa > sb else sb) if z >> 62 & 1 else (sa if sa < sb else sb)
        else:
            r = ((z & 0xFFFFF) * n) >> 20
            c = ((z >> 20 & 0xFFFFF) * n) >> 20
            s2 = sums[rc + r * big + c]
            s = (s2 + ((z >> 40 & 0xFFFFF) * (n - 1) >> 20) + 1) % n
            r2 = sums[cs + c * big + s]
            c2 = sums[rs + r * big + s]
        ra, ca, sa = r, c, s
        rb, cb, sb = sums[cs + c2 * big + s2], sums[rs + r2 * big + s2], sums[rc + r2 * big + c2]
        d = r - r2
        x, x2 = cs + c * big, cs + c2 * big
        sums[x + s] += d
        sums[x2 + s2] += d
        sums[x + s2] -= d
        sums[x2 + s] -= d
        d = c - c2
        x, x2 = rs + r * big, rs + r2 * big
        sums[x + s] += d
        sums[x2 + s2] += d
        sums[x + s2] -= d
        sums[x2 + s] -= d
        d = s - s2
        x, x2 = rc + r * big, rc + r2 * big
        sums[x + c] += d
        sums[x2 + c2] += d
        sums[x + c2] -= d
        sums[x2 + c] -= d
        improper = sb != s2
        if not improper:
            left -= 1


def jacobson_matthews(squares: np.ndarray, seeds: np.ndarray, moves: int) -> np.ndarray:
    """Run the Jacobson–Matthews chain from each square (B, n, n) until it has been proper ``moves`` times."""
    count, n, _ = squares.shape
    if moves <= 0 or n < 2:
        return squares.copy()
    return _jm_padded(squares, np.full(count, n), seeds, np.full(count, moves))


@functools.cache
def base_pool(n: int) -> np.ndarray:
    """POOL_SIZE well-mixed n x n Latin squares, the same in every process (the chains' burn-in)."""
    seeds = np.arange(POOL_SIZE, dtype=np.uint64) + np.uint64(_POOL_SEED)
    start = random_isotope(np.broadcast_to(cyclic_square(n), (POOL_SIZE, n, n)), seeds)
    pool = jacobson_matthews(start, seeds, moves=n**2)  # about n**3 chain steps
    pool.flags.writeable = False
    return pool


def _squares_padded(sizes: np.ndarray, seeds: np.ndarray, augment: bool, moves: np.ndarray) -> np.ndarray:
    """One random Latin square of each sample's size, padded to the largest: (B, N, N)."""
    big = int(sizes.max())
    choice = _below(_uniform(seeds, _CHOICE, 1, start=3)[:, 0], POOL_SIZE)
    squares = np.zeros((len(seeds), big, big), np.int64)
    for n in np.unique(sizes).tolist():
        idx = np.flatnonzero(sizes == n)
        squares[idx, :n, :n] = base_pool(n)[choice[idx]]
    if augment:
        squares = _isotope_padded(squares, sizes, seeds)
    return _jm_padded(squares, sizes, seeds, moves)


def random_latin_squares(n: int, seeds: np.ndarray, augment: bool = True, moves: int | None = None) -> np.ndarray:
    """One random n x n Latin square (symbol indices 0..n-1) per seed: (len(seeds), n, n)."""
    count = len(seeds)
    return _squares_padded(np.full(count, n), seeds, augment, np.full(count, (n + 1) // 2 if moves is None else moves))


# ------------------------------------------------------------------------------ puzzles


def make_puzzles(
    seeds: np.ndarray, sizes: np.ndarray, modes: np.ndarray, fills: np.ndarray, augment: bool = True
) -> dict[str, torch.Tensor]:
    """A batch: per seed a random square of the given size and mode with round(fill * n * n) cells shown."""
    count, big = len(seeds), int(sizes.max())
    sizes = sizes.astype(np.int64)
    squares = _squares_padded(sizes, seeds, augment, (sizes + 1) // 2)
    inside = _inside(sizes, big)
    target = np.where(inside, SYMBOL_TOKENS[modes[:, None, None], sizes[:, None, None], squares], PAD)
    # The shown cells are the k with the smallest draws (k = round(fill * n^2)): those below the
    # k-th smallest draw, padding and a sentinel sorting after them all.
    draws = np.where(inside, _grid_draws(seeds, _HIDE, sizes, big, big), _DRAW_PAD).reshape(count, -1)
    shown_count = np.floor(fills * sizes * sizes + 0.5).astype(np.int64)
    ordered = np.concatenate([np.sort(draws, axis=1), np.full((count, 1), _DRAW_PAD + np.uint64(1))], axis=1)
    shown = (draws < np.take_along_axis(ordered, shown_count[:, None], axis=1)).reshape(count, big, big)
    tokens = np.where(shown, target, np.where(inside, EMPTY, PAD))
    return {
        "tokens": torch.from_numpy(tokens),
        "target": torch.from_numpy(target),
        "size": torch.from_numpy(sizes),
        "mode": torch.from_numpy(modes.astype(np.int64)),
    }


def check_knobs(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the data knobs (sizes, modes, fill_min, fill_max); raise ValueError naming the fix."""
    sizes = [int(n) for n in knobs["sizes"]]
    modes = list(knobs["modes"])
    fill_min, fill_max = float(knobs["fill_min"]), float(knobs["fill_max"])
    if not sizes or any(not MIN_SIZE <= n <= MAX_SIZE for n in sizes):
        raise ValueError(f"knob sizes={sizes}: give a non-empty list of sizes in {MIN_SIZE}..{MAX_SIZE}")
    if not modes or any(m not in Mode.__members__ for m in modes):
        raise ValueError(f"knob modes={modes}: give a non-empty list out of {list(Mode.__members__)}")
    if not 0.0 <= fill_min <= fill_max <= 1.0:
        raise ValueError(f"knobs fill_min={fill_min}, fill_max={fill_max}: need 0 <= fill_min <= fill_max <= 1")
    return {**knobs, "sizes": sizes, "modes": modes, "fill_min": fill_min, "fill_max": fill_max}


def sample_puzzles(seeds: np.ndarray, knobs: Mapping[str, Any], augment: bool = True) -> dict[str, torch.Tensor]:
    """A batch whose sizes, modes and fill ratios are drawn per seed from the knobs."""
    knobs = check_knobs(knobs)
    u = _uniform(seeds, _CHOICE, 3)
    sizes = np.array(knobs["sizes"])[_below(u[:, 0], len(knobs["sizes"]))]
    modes = np.array([Mode[m] for m in knobs["modes"]])[_below(u[:, 1], len(knobs["modes"]))]
    fills = knobs["fill_min"] + u[:, 2] * (knobs["fill_max"] - knobs["fill_min"])
    return make_puzzles(seeds, sizes, modes, fills, augment)


def pad_cat(batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate batches, padding their grids with PAD to the largest."""
    big = max(b["tokens"].shape[-1] for b in batches)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in batches[0]}
    for b in batches:
        pad = (0, big - b["tokens"].shape[-1], 0, big - b["tokens"].shape[-2])
        for k, v in b.items():
            out[k].append(F.pad(v, pad, value=PAD) if k in ("tokens", "target") else v)
    return {k: torch.cat(v) for k, v in out.items()}


class LatinDataset(torch.utils.data.Dataset):
    """Puzzles made on demand from SampleKeys; ``__getitems__`` builds a whole batch at once."""

    def __init__(self, length: int, knobs: Mapping[str, Any], augment: bool = True) -> None:
        self.length = length
        self.knobs = check_knobs(knobs)  # fallbacks for knobs a key does not carry
        self.augment = augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        """One puzzle, unbatched."""
        return {k: v[0] for k, v in self.__getitems__([key]).items()}

    def __getitems__(self, keys: Sequence[SampleKey]) -> dict[str, torch.Tensor]:
        """The batch for ``keys``, in their order."""
        # The keys of a batch normally share their knobs; any that differ are made apart.
        groups: list[tuple[Mapping[str, Any], list[int]]] = []
        for i, key in enumerate(keys):
            for knobs, positions in groups:
                if key.knobs is knobs or key.knobs == knobs:
                    positions.append(i)
                    break
            else:
                groups.append((key.knobs, [i]))
        seeds = as_seeds([key.seed for key in keys])
        parts = [sample_puzzles(seeds[pos], {**self.knobs, **knobs}, self.augment) for knobs, pos in groups]
        if len(parts) == 1:
            return parts[0]
        batch = pad_cat(parts)
        order = torch.from_numpy(np.argsort(np.concatenate([pos for _, pos in groups])))
        return {k: v[order] for k, v in batch.items()}


# ------------------------------------------------------------------------------ checking


def latin_violations(grid: torch.Tensor) -> torch.Tensor:
    """Per grid (B, N, N): repeated symbols summed over rows and columns (0 for a Latin square)."""
    values = F.one_hot(grid, VOCAB_SIZE)[..., VALUE_OFFSET + VALUE_MIN :]  # PAD and EMPTY don't count
    rows = (values.sum(2) - 1).clamp(min=0).sum((1, 2))
    cols = (values.sum(1) - 1).clamp(min=0).sum((1, 2))
    return rows + cols


def is_valid_completion(
    grid: torch.Tensor, clues: torch.Tensor, size: torch.Tensor, mode: torch.Tensor
) -> torch.Tensor:
    """Per grid: a Latin square over the symbols of its n and mode that keeps every clue."""
    big = grid.shape[-1]
    pos = torch.arange(big, device=grid.device)
    inside = (pos[None, :, None] < size[:, None, None]) & (pos[None, None, :] < size[:, None, None])
    allowed = allowed_tokens().to(grid.device)[mode, size]  # (B, V)
    symbol_ok = allowed.gather(1, grid.flatten(1)).view_as(grid) | ~inside
    clue_ok = (clues == EMPTY) | (grid == clues)
    return symbol_ok.all((1, 2)) & clue_ok.all((1, 2)) & (latin_violations(grid) == 0)


Logits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def decode_iterative(
    model: Logits,
    tokens: torch.Tensor,
    size: torch.Tensor,
    mode: torch.Tensor,
    stop_when_valid: bool = True,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill each grid's most confident hidden cell, re-run the model, repeat: at most n_hidden passes.

    With ``stop_when_valid`` a grid stops as soon as its argmax completion is a Latin square that
    keeps the clues, and takes that completion. The check needs no solution (a deployed solver can
    make it too), and once the model is good it saves most of the passes. ``logits``: the model's
    output for ``tokens`` if already computed, used as the first pass.
    """
    tokens = tokens.clone()
    active = torch.nonzero((tokens == EMPTY).any(2).any(1)).flatten()
    while active.numel():
        grid = tokens[active]
        hidden = grid == EMPTY
        out = model(grid, size[active], mode[active]) if logits is None else logits[active]
        logits = None
        confidence, choice = out.softmax(-1).max(-1)
        done = torch.zeros(len(active), dtype=torch.bool, device=tokens.device)
        if stop_when_valid:
            completion = torch.where(hidden, choice, grid)
            done = is_valid_completion(completion, grid, size[active], mode[active])
            tokens[active[done]] = completion[done]
        cell = confidence.masked_fill(~hidden, -1.0).flatten(1).argmax(1)
        rows = torch.arange(len(active), device=tokens.device)
        grid.view(len(active), -1)[rows, cell] = choice.view(len(active), -1)[rows, cell]
        tokens[active[~done]] = grid[~done]
        active = active[~done & (hidden.sum((1, 2)) > 1)]  # a grid whose last cell was filled is done
    return tokens


# ------------------------------------------------------------------------------ model


class Block(nn.Module):
    """Pre-norm transformer layer over the cells of a grid; callable as ``block(x)``.

    Padding cells carry the zero vector through the whole network, so a block reads its key mask
    from its input: ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` recomputes
    it exactly, with no mask held in attributes or closures.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, L, d); rows of x that are all zero are padding."""
        batch, length, width = x.shape
        valid = x.ne(0).any(-1, keepdim=True)
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=valid.view(batch, 1, 1, length))
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        x = x + self.mlp(self.norm2(x))
        return x * valid


class LatinTransformer(nn.Module):
    """Encoder over the cells: token + row + column + size + mode embeddings, pre-norm blocks, a symbol head."""

    def __init__(self, d_model: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.token = nn.Embedding(VOCAB_SIZE, d_model)
        self.row = nn.Embedding(MAX_SIZE, d_model)
        self.col = nn.Embedding(MAX_SIZE, d_model)
        self.size = nn.Embedding(MAX_SIZE + 1, d_model)
        self.mode = nn.Embedding(len(Mode), d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE)
        self.register_buffer("allowed", allowed_tokens().clone(), persistent=False)
        self.register_buffer("pad_only", F.one_hot(torch.tensor(PAD), VOCAB_SIZE).bool(), persistent=False)
        for module in self.modules():  # small init: the residual stream starts near the embeddings
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, size: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, N, VOCAB_SIZE); a token a cell may not hold gets -inf (PAD cells: all but PAD)."""
        batch, big, _ = tokens.shape
        pos = torch.arange(big, device=tokens.device)
        x = self.token(tokens) + self.row(pos)[:, None] + self.col(pos)[None, :]
        x = x + (self.size(size) + self.mode(mode))[:, None, None]
        valid = (tokens != PAD).unsqueeze(-1)
        x = (x * valid).flatten(1, 2)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).view(batch, big, big, VOCAB_SIZE)
        allowed = torch.where(valid, self.allowed[mode, size][:, None, None], self.pad_only)
        return logits.masked_fill(~allowed, float("-inf"))


# ------------------------------------------------------------------------------ task


class LatinOptions(BaseModel):
    """Options of the Latin task (``[task_options]`` in a config file, ``-o task.KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid")

    size_min: int = Field(4, ge=MIN_SIZE, le=MAX_SIZE)
    size_max: int = Field(6, ge=MIN_SIZE, le=MAX_SIZE)
    modes: list[ModeName] = ["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]
    fill_min: float = Field(0.3, ge=0.0, le=1.0)
    fill_max: float = Field(0.7, ge=0.0, le=1.0)
    augment: bool = True
    d_model: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    samples_per_epoch: int = Field(25_600, ge=1)
    val_sizes: list[int] = [4, 5, 6]
    val_puzzles: int = Field(200, ge=1)  # per size
    val_fill: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> LatinOptions:
        if self.size_min > self.size_max:
            raise ValueError(f"size_min={self.size_min} > size_max={self.size_max}: swap them")
        if self.fill_min > self.fill_max:
            raise ValueError(f"fill_min={self.fill_min} > fill_max={self.fill_max}: swap them")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of heads={self.heads}")
        if not self.modes:
            raise ValueError("modes is empty: name at least one of STANDARD, ZERO_INCLUSIVE, NEGATIVE")
        if not self.val_sizes or any(not MIN_SIZE <= n <= MAX_SIZE for n in self.val_sizes):
            raise ValueError(f"val_sizes={self.val_sizes}: give sizes in {MIN_SIZE}..{MAX_SIZE}")
        return self


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


class LatinTask:
    """Latin-square completion: the default kktrain task."""

    name = "latin"

    def __init__(self, options: LatinOptions | None = None) -> None:
        self.options = options or LatinOptions()
        self.knobs = self.default_knobs()
        self._val_set: dict[int, dict[str, torch.Tensor]] | None = None

    def config_defaults(self) -> dict[str, Any]:
        """Five minutes on two CPU cores to >= 99% valid grids on held-out n = 4..6 puzzles."""
        return {
            "batch_size": 128,
            "epochs": 8,
            "max_steps": 1600,
            "optimizer.lr": 1e-3,
            "schedule.warmup_steps": 100,
            "val_every": 200,
            "log_every": 50,
            "checkpoint.every_steps": 0,  # epochs are 200 steps and each ends with a checkpoint
            "checkpoint.best_metric": "val/valid_iter",
        }

    def build_model(self) -> nn.Module:
        """A fresh LatinTransformer of the configured shape."""
        o = self.options
        return LatinTransformer(o.d_model, o.layers, o.heads)

    def train_dataset(self) -> LatinDataset:
        """``samples_per_epoch`` puzzles drawn from the knobs each key carries."""
        return LatinDataset(self.options.samples_per_epoch, self.default_knobs(), self.options.augment)

    def collate(self, items: Any) -> dict[str, torch.Tensor]:
        """A batch from ``__getitems__`` as is; a list of single puzzles padded and stacked."""
        if isinstance(items, Mapping):
            return dict(items)
        return pad_cat([{k: v.unsqueeze(0) for k, v in item.items()} for item in items])

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy over the hidden cells."""
        device = _device_of(model)
        tokens, target, size, mode = (batch[k].to(device, non_blocking=True) for k in BATCH_KEYS)
        logits = model(tokens, size, mode)
        hidden = tokens == EMPTY
        total = F.cross_entropy(logits.flatten(0, 2), target.masked_fill(~hidden, -100).flatten(), reduction="sum")
        return total / hidden.sum().clamp(min=1)

    def validation_set(self) -> dict[int, dict[str, torch.Tensor]]:
        """The fixed held-out puzzles per size: val_fill shown, modes in turn, from a constant seed."""
        if self._val_set is None:
            o, count = self.options, self.options.val_puzzles
            modes = np.array([Mode[m] for m in o.modes])[np.arange(count) % len(o.modes)]
            self._val_set = {}
            for n in o.val_sizes:
                seeds = np.uint64(_VAL_SEED) + np.uint64(n << 32) + np.arange(count, dtype=np.uint64)
                self._val_set[n] = make_puzzles(
                    seeds, np.full(count, n), modes, np.full(count, o.val_fill), augment=True
                )
        return self._val_set

    @torch.no_grad()
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Per size and averaged: loss, cell accuracy, valid grids (one-shot and iterative), ..."""
        metrics: dict[str, float] = {}
        for n, batch in self.validation_set().items():
            tokens, target, size, mode = (batch[k].to(device) for k in BATCH_KEYS)
            logits = model(tokens, size, mode)
            hidden = tokens == EMPTY
            log_probs = logits[hidden].log_softmax(-1)
            probs = log_probs.exp()
            oneshot = torch.where(hidden, logits.argmax(-1), tokens)
            iterative = decode_iterative(model, tokens, size, mode, logits=logits)  # reuses this pass
            per_size = {
                "loss": F.nll_loss(log_probs, target[hidden]),
                "cell_acc": (oneshot[hidden] == target[hidden]).float().mean(),
                "valid_oneshot": is_valid_completion(oneshot, tokens, size, mode).float().mean(),
                "valid_iter": is_valid_completion(iterative, tokens, size, mode).float().mean(),
                "violations": latin_violations(oneshot).float().mean(),
                "confidence": probs.max(-1).values.mean(),
                "entropy": -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1).mean(),
            }
            metrics.update({f"{k}/n{n}": float(v) for k, v in per_size.items()})
        names = ("loss", "cell_acc", "valid_oneshot", "valid_iter", "violations", "confidence", "entropy")
        for k in names:
            metrics[k] = sum(metrics[f"{k}/n{n}"] for n in self.options.val_sizes) / len(self.options.val_sizes)
        return metrics

    def default_knobs(self) -> dict[str, Any]:
        """Sizes size_min..size_max, the configured modes and fill range."""
        o = self.options
        return {
            "sizes": list(range(o.size_min, o.size_max + 1)),
            "modes": list(o.modes),
            "fill_min": o.fill_min,
            "fill_max": o.fill_max,
        }

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Check the knobs here, where a bad value can still stop the run; data reads them from keys."""
        self.knobs = check_knobs({**self.knobs, **knobs})

    def checkpoint_blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer layers (each callable as ``block(x)``, see :class:`Block`)."""
        return list(model.blocks)


def make_task(options: LatinOptions | None = None) -> LatinTask:
    """The factory named by ``--task kktrain.tasks.latin:make_task`` (entry point ``latin``)."""
    return LatinTask(options)


make_task.Options = LatinOptions  # type: ignore[attr-defined]
