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
    return np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64)


def _uniform(seeds: np.ndarray, purpose: int, count: int, start: int = 0) -> np.ndarray:
    """Draws ``start .. start+count-1`` of stream ``purpose`` of each seed: (len(seeds), count) in [0, 1)."""
    counter = np.arange(start, start + count, dtype=np.uint64)
    bits = _bits(_stream(seeds, purpose)[:, None], counter)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _below(u: np.ndarray, m: np.ndarray | int) -> np.ndarray:
    """Uniforms in [0, 1) to integers in [0, m)."""
    return np.minimum((u * m).astype(np.int64), np.asarray(m) - 1)


def _field(bits: np.ndarray, shift: int, m: int) -> np.ndarray:
    """Bits ``shift .. shift+19`` as an integer in [0, m) (multiply-shift: bias below m / 2**20)."""
    return (((bits >> np.uint64(shift)) & np.uint64(0xFFFFF)) * np.uint64(m) >> np.uint64(20)).astype(np.int64)


# ------------------------------------------------------------------------------ Latin squares


def cyclic_square(n: int) -> np.ndarray:
    """The Cayley table of Z_n: symbol (r + c) mod n."""
    return np.add.outer(np.arange(n), np.arange(n)) % n


def random_isotope(squares: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Permute the rows, columns and symbols of each square (B, n, n) at random."""
    count, n, _ = squares.shape
    u = _uniform(seeds, _ISOTOPY, 3 * n).reshape(count, 3, n)
    rows, cols, syms = np.argsort(u, axis=2).transpose(1, 0, 2)
    out = squares[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return np.take_along_axis(syms, out.reshape(count, -1), axis=1).reshape(count, n, n)


def _pick_one(line: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Index of a 1 in each row of ``line`` (which has one or two): the last where ``last``, else the first."""
    ones = line == 1
    return np.where(last, line.shape[1] - 1 - ones[:, ::-1].argmax(axis=1), ones.argmax(axis=1))


def jacobson_matthews(squares: np.ndarray, seeds: np.ndarray, moves: int) -> np.ndarray:
    """Run the Jacobson–Matthews chain from each square (B, n, n) until it has been proper ``moves`` times."""
    count, n, _ = squares.shape
    if moves <= 0 or n < 2:
        return squares.copy()
    # The incidence cube: cube[b, r, c, s] = 1 iff cell (r, c) holds s, kept flat so that every
    # access is one 1-D gather; R, C, S below are the offsets b*n^3 + r*n^2, c*n and s. A step from
    # a proper square mostly lands on an improper one (one entry -1); the chain goes on until it is
    # proper again, about n steps. The chain is uniform on proper squares observed at its k-th
    # proper visit; stopping at the first proper square after a fixed number of *steps* is biased
    # (measured: 8% instead of 25% of n=4 squares in the Klein class), so moves are counted.
    cube = np.zeros(count * n**3, np.int8)
    cube[np.arange(count * n * n) * n + squares.reshape(-1)] = 1
    line = np.arange(n)
    stream = _stream(seeds, _MIX)
    taken = np.zeros(count, np.uint64)  # steps so far: the position in each stream
    left = np.full(count, moves, np.int64)
    improper = np.zeros(count, bool)
    bad_r, bad_c, bad_s = (np.zeros(count, np.int64) for _ in range(3))  # where the -1 is
    active = np.arange(count)
    while active.size:
        b = active
        bits = _bits(stream[b], taken[b])
        taken[b] += np.uint64(1)
        imp = improper[b]
        base = b * n**3
        # From a proper square: a uniform cell (r, c, s) with cube 0; from an improper one: the -1.
        R = np.where(imp, bad_r[b], base + _field(bits, 0, n) * n * n)
        C = np.where(imp, bad_c[b], _field(bits, 20, n) * n)
        cell = cube[(R + C)[:, None] + line]  # cube[b, r, c, :]
        S = np.where(imp, bad_s[b], (cell.argmax(axis=1) + 1 + _field(bits, 40, n - 1)) % n)
        # The other 1s on the three lines through (r, c, s); two to choose from when improper.
        R2 = base + n * n * _pick_one(cube[(base + C + S)[:, None] + line * n * n], bits >> np.uint64(60) & 1)
        C2 = n * _pick_one(cube[(R + S)[:, None] + line * n], bits >> np.uint64(61) & 1)
        S2 = _pick_one(cell, bits >> np.uint64(62) & 1)
        # Indices within each group are distinct (r != r2, c != c2, s != s2), so += is exact.
        cube[np.concatenate([R + C + S, R + C2 + S2, R2 + C + S2, R2 + C2 + S])] += 1
        cube[np.concatenate([R + C + S2, R + C2 + S, R2 + C + S, R2 + C2 + S2])] -= 1
        now_improper = cube[R2 + C2 + S2] < 0
        improper[b], bad_r[b], bad_c[b], bad_s[b] = now_improper, R2, C2, S2
        left[b] -= ~now_improper
        active = np.flatnonzero((left > 0) | improper)
    return cube.reshape(count, n, n, n).argmax(axis=3)


@functools.cache
def base_pool(n: int) -> np.ndarray:
    """POOL_SIZE well-mixed n x n Latin squares, the same in every process (the chains' burn-in)."""
    seeds = np.arange(POOL_SIZE, dtype=np.uint64) + np.uint64(_POOL_SEED)
    start = random_isotope(np.broadcast_to(cyclic_square(n), (POOL_SIZE, n, n)), seeds)
    pool = jacobson_matthews(start, seeds, moves=n**2)  # about n**3 chain steps
    pool.flags.writeable = False
    return pool


def random_latin_squares(n: int, seeds: np.ndarray, augment: bool = True, moves: int | None = None) -> np.ndarray:
    """One random n x n Latin square (symbol indices 0..n-1) per seed: (len(seeds), n, n)."""
    pool = base_pool(n)
    squares = pool[_below(_uniform(seeds, _CHOICE, 1, start=3)[:, 0], len(pool))]
    if augment:
        squares = random_isotope(squares, seeds)
    return jacobson_matthews(squares, seeds, moves=(n + 1) // 2 if moves is None else moves)


# ------------------------------------------------------------------------------ puzzles


def make_puzzles(
    seeds: np.ndarray, sizes: np.ndarray, modes: np.ndarray, fills: np.ndarray, augment: bool = True
) -> dict[str, torch.Tensor]:
    """A batch: per seed a random square of the given size and mode with round(fill * n * n) cells shown."""
    count, big = len(seeds), int(sizes.max())
    tokens = np.full((count, big, big), PAD, np.int64)
    target = np.full((count, big, big), PAD, np.int64)
    for n in np.unique(sizes).tolist():
        idx = np.flatnonzero(sizes == n)
        squares = random_latin_squares(n, seeds[idx], augment)
        solution = SYMBOL_TOKENS[modes[idx, None, None], n, squares]
        order = np.argsort(_uniform(seeds[idx], _HIDE, n * n), axis=1)
        rank = np.argsort(order, axis=1).reshape(len(idx), n, n)
        shown = rank < np.floor(fills[idx] * n * n + 0.5)[:, None, None]
        target[idx, :n, :n] = solution
        tokens[idx, :n, :n] = np.where(shown, solution, EMPTY)
    return {
        "tokens": torch.from_numpy(tokens),
        "target": torch.from_numpy(target),
        "size": torch.from_numpy(sizes.astype(np.int64)),
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

    allowed: torch.Tensor
    pad_only: torch.Tensor

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
        blocks = model.blocks
        assert isinstance(blocks, nn.ModuleList)
        return list(blocks)


def make_task(options: LatinOptions | None = None) -> LatinTask:
    """The factory named by ``--task kktrain.tasks.latin:make_task`` (entry point ``latin``)."""
    return LatinTask(options)


make_task.Options = LatinOptions  # type: ignore[attr-defined]
