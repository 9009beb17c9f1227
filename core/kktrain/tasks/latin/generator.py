"""Random Latin squares and puzzles, made from SampleKeys alone (numpy over whole batches)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kktrain.task import SampleKey
from kktrain.tasks.latin.vocab import EMPTY, MAX_SIZE, MIN_SIZE, PAD, SYMBOL_TOKENS, Mode

# ------------------------------------------------------------------------------ randomness

# A random number is SplitMix64 evaluated at (seed, purpose, counter): any draw of any sample is
# one vectorized hash, and no draw depends on which other samples share the batch. (uint64 array
# arithmetic wraps around silently, as the hash wants.)
_GOLDEN = 0x9E3779B97F4A7C15
_CHOICE, _ISOTOPY, _MIX, _HIDE = 1, 2, 3, 4  # purposes: independent streams per seed
_POOL_SEED = 0x1A7125EED
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
        span = slice(b * 3 * n2, (b + 1) * 3 * n2)
        sums_of_b = flat[span].tolist()
        _jm_tail(
            sums_of_b, int(size[i]), big, int(stream[i]), step, int(left[i]), bool(improper[i]),
            (int(bad[0, i]), int(bad[1, i]), int(bad[2, i])), cand_a[:, i].tolist(), cand_b[:, i].tolist(),
        )
        flat[span] = sums_of_b
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

    sample_keys = True  # every puzzle is drawn from its key (seed and knobs), in any worker

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
