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

from kktrain.tasks.latin.decode import (
    Logits,
    cannot_complete,
    decode_fast,
    decode_iterative,
    is_valid_completion,
    latin_violations,
    tta_logits,
    tta_views,
)
from kktrain.tasks.latin.generator import (
    POOL_SIZE,
    LatinDataset,
    as_seeds,
    base_pool,
    check_knobs,
    cyclic_square,
    jacobson_matthews,
    make_puzzles,
    pad_cat,
    random_isotope,
    random_latin_squares,
    sample_puzzles,
)
from kktrain.tasks.latin.model import Block, LatinTransformer
from kktrain.tasks.latin.task import (
    LatinOptions,
    LatinTask,
    constraint_penalty_sum,
    focal_loss_sum,
    grid_scores,
    make_task,
)
from kktrain.tasks.latin.vocab import (
    BATCH_KEYS,
    EMPTY,
    MAX_SIZE,
    MIN_SIZE,
    PAD,
    SYMBOL_TOKENS,
    VALUE_MAX,
    VALUE_MIN,
    VALUE_OFFSET,
    VOCAB_SIZE,
    Mode,
    ModeName,
    allowed_tokens,
    symbol_values,
)

__all__ = [
    "BATCH_KEYS", "EMPTY", "MAX_SIZE", "MIN_SIZE", "PAD", "POOL_SIZE", "SYMBOL_TOKENS", "VALUE_MAX", "VALUE_MIN",
    "VALUE_OFFSET", "VOCAB_SIZE", "Block", "LatinDataset", "LatinOptions", "LatinTask", "LatinTransformer", "Logits",
    "Mode", "ModeName", "allowed_tokens", "as_seeds", "constraint_penalty_sum", "focal_loss_sum", "grid_scores", "cannot_complete", "decode_fast", "tta_logits", "tta_views", "base_pool", "check_knobs", "cyclic_square", "decode_iterative",
    "is_valid_completion", "jacobson_matthews", "latin_violations", "make_puzzles", "make_task", "pad_cat",
    "random_isotope", "random_latin_squares", "sample_puzzles", "symbol_values",
]
