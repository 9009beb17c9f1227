"""The built-in Latin-square task: generator, dataset, checker, model, decoding, validation."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kktrain.task import SampleKey, Task
from kktrain.tasks import latin as L
from kktrain.tasks.latin import generator

ALL_MODES = ["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]


def keys_for(knobs, count, first_seed=1000):
    """SampleKeys with consecutive seeds."""
    return [SampleKey(i, first_seed + i, knobs) for i in range(count)]


def knobs(**overrides):
    """Default knobs with some replaced."""
    return {**L.make_task().default_knobs(), **overrides}


def intercalates(squares: np.ndarray) -> np.ndarray:
    """Number of 2x2 Latin subsquares of each square (B, n, n): an isotopy invariant."""
    n = squares.shape[-1]
    same_diag = squares[:, :, None, :, None] == squares[:, None, :, None, :]  # L[r1,c1] == L[r2,c2]
    same_anti = squares[:, :, None, None, :] == squares[:, None, :, :, None]  # L[r1,c2] == L[r2,c1]
    upper = np.triu(np.ones((n, n), bool), 1)
    both = same_diag & same_anti & upper[None, :, :, None, None] & upper[None, None, None, :, :]
    return both.sum((1, 2, 3, 4))


def is_latin(squares: np.ndarray) -> bool:
    """Every row and column of every square (B, n, n) of symbol indices is a permutation of 0..n-1."""
    n = squares.shape[-1]
    return bool((np.sort(squares, 2) == np.arange(n)).all() and (np.sort(squares, 1) == np.arange(n)[:, None]).all())


# ------------------------------------------------------------------------------ vocabulary, generator


def test_vocabulary_layout():
    assert L.VOCAB_SIZE == 35
    assert (L.PAD, L.EMPTY) == (0, 1)
    assert L.VALUE_OFFSET + L.VALUE_MIN == 2 and L.VALUE_OFFSET + L.VALUE_MAX == 34
    assert L.symbol_values(5, L.Mode.NEGATIVE) == [-2, -1, 0, 1, 2]
    assert L.symbol_values(4, L.Mode.NEGATIVE) == [-2, -1, 1, 2]
    assert L.symbol_values(3, L.Mode.ZERO_INCLUSIVE) == [0, 1, 2]
    for n in range(L.MIN_SIZE, L.MAX_SIZE + 1):
        for mode in L.Mode:
            values = L.symbol_values(n, mode)
            assert len(set(values)) == n and L.VALUE_MIN <= min(values) and max(values) <= L.VALUE_MAX


@pytest.mark.parametrize("mode", ALL_MODES)
def test_generated_squares_are_latin_for_every_size(mode):
    sizes = list(range(L.MIN_SIZE, L.MAX_SIZE + 1))
    k = knobs(sizes=sizes, modes=[mode])
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 96))
    assert set(batch["size"].tolist()) == set(sizes)  # 96 draws over 14 sizes: all appear
    for target, n in zip(batch["target"], batch["size"].tolist()):
        grid = target[:n, :n]
        assert (target[n:] == L.PAD).all() and (target[:, n:] == L.PAD).all()
        symbols = sorted(v + L.VALUE_OFFSET for v in L.symbol_values(n, L.Mode[mode]))
        for line in [*grid, *grid.T]:
            assert sorted(line.tolist()) == symbols


def test_jacobson_matthews_keeps_squares_latin():
    for n in (3, 8, 16):
        start = np.broadcast_to(L.cyclic_square(n), (16, n, n)).copy()
        mixed = L.jacobson_matthews(start, L.as_seeds(range(16)), moves=5)
        assert is_latin(mixed) and not (mixed == start).all()


def test_generator_matches_uniform_class_frequencies():
    # Under the uniform law, 1/4 of the 576 squares of order 4 are in the Klein class (12
    # intercalates) and 17280/161280 of order 5 are isotopic to Z_5 (no intercalate). Isotopes
    # of the cyclic square alone would give 0 and 1.
    fours = L.random_latin_squares(4, L.as_seeds(range(3000)))
    assert is_latin(fours)
    assert abs((intercalates(fours) == 12).mean() - 0.25) < 0.04
    fives = L.random_latin_squares(5, L.as_seeds(range(3000)))
    assert abs((intercalates(fives) == 0).mean() - 17280 / 161280) < 0.03
    assert len({s.tobytes() for s in fives[:1000]}) >= 990


def test_generator_leaves_the_isotopy_classes_of_the_pool():
    sevens = L.random_latin_squares(7, L.as_seeds(range(400)))
    assert is_latin(sevens)
    assert len(set(intercalates(sevens).tolist())) >= 8
    pool_classes = set(intercalates(np.asarray(L.base_pool(7))).tolist())
    assert set(intercalates(sevens).tolist()) - pool_classes  # moves reach classes the pool lacks


def batch_digest(batches) -> str:
    """SHA-256 of the tensors of some batches."""
    h = hashlib.sha256()
    for batch in batches:
        for name in L.BATCH_KEYS:
            h.update(batch[name].numpy().tobytes())
    return h.hexdigest()


def test_generator_output_is_pinned():
    # The puzzles of given keys, pinned: a faster generator must make the very same puzzles (the
    # digest was taken from the first, unoptimised generator), and a change of the sampler has to
    # change this digest on purpose, with its class frequencies measured again.
    pinned = []
    for k in (knobs(), knobs(sizes=[3, 9, 16], modes=["NEGATIVE"], fill_min=0.0, fill_max=1.0)):
        pinned.append(L.LatinDataset(10, k).__getitems__([SampleKey(i, 12345 + 7 * i, k) for i in range(64)]))
    assert batch_digest(pinned) == "3da1daa4766126123c9151d307b06b08d949a38eb01ad4e69c0f1987a23acfe6"


@pytest.mark.parametrize("tail", [0, 10**9])
def test_python_tail_runs_the_same_chain(monkeypatch, tail):
    # The last few chains of a batch finish in plain Python (generator._JM_TAIL): all in numpy (0) or
    # all in Python (10**9) must give the same squares as the default split.
    seeds = L.as_seeds(range(300, 364))
    expected = {n: L.random_latin_squares(n, seeds) for n in (4, 7, 11)}
    monkeypatch.setattr(generator, "_JM_TAIL", tail)
    for n, squares in expected.items():
        assert np.array_equal(L.random_latin_squares(n, seeds), squares)


def test_a_batch_of_mixed_sizes_gives_each_sample_its_own_puzzle():
    seeds = L.as_seeds(range(40))
    sizes = np.array([3, 16, 5, 9] * 10)
    modes, fills = np.arange(40) % 3, np.linspace(0.0, 1.0, 40)
    mixed = L.make_puzzles(seeds, sizes, modes, fills)
    for n in (3, 5, 9, 16):
        idx = np.flatnonzero(sizes == n)
        alone = L.make_puzzles(seeds[idx], sizes[idx], modes[idx], fills[idx])
        assert torch.equal(mixed["tokens"][idx, :n, :n], alone["tokens"])
        assert torch.equal(mixed["target"][idx, :n, :n], alone["target"])
        assert (mixed["target"][idx, n:] == L.PAD).all() and (mixed["tokens"][idx, :, n:] == L.PAD).all()


def test_pools_are_built_only_for_the_sizes_in_use():
    L.base_pool.cache_clear()
    try:
        task = L.make_task()
        dataset = task.train_dataset()
        assert L.base_pool.cache_info().currsize == 0  # building the task costs nothing
        k = knobs(sizes=[5, 7])
        dataset.__getitems__(keys_for(k, 16))
        assert L.base_pool.cache_info().currsize == 2
    finally:
        L.base_pool.cache_clear()


@pytest.mark.parametrize("fill", [0.0, 0.3, 0.5, 1.0])
def test_fill_ratio_is_exact(fill):
    k = knobs(sizes=[5, 7], fill_min=fill, fill_max=fill)
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 32))
    for tokens, target, n in zip(batch["tokens"], batch["target"], batch["size"].tolist()):
        shown = (tokens[:n, :n] != L.EMPTY).sum().item()
        assert shown == math.floor(fill * n * n + 0.5)
        assert ((tokens == target) | (tokens == L.EMPTY)).all()


def test_fill_range_is_respected_and_used():
    k = knobs(sizes=[6], fill_min=0.2, fill_max=0.6)
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 200))
    share = (batch["tokens"] != L.EMPTY).float().mean((1, 2))
    assert share.min() >= 0.2 - 0.5 / 36 and share.max() <= 0.6 + 0.5 / 36
    assert share.min() < 0.3 and share.max() > 0.5


# ------------------------------------------------------------------------------ dataset


def test_same_keys_same_batch_and_independent_of_batch_composition():
    k = knobs()
    dataset = L.LatinDataset(10, k)
    keys = keys_for(k, 64)
    first, again = dataset.__getitems__(keys), dataset.__getitems__(keys)
    for name in first:
        assert torch.equal(first[name], again[name])
    alone = dataset[keys[5]]  # another batch, another grouping: the same puzzle
    n = alone["size"].item()
    assert torch.equal(alone["tokens"], first["tokens"][5, :n, :n])
    assert torch.equal(alone["target"], first["target"][5, :n, :n])
    other = dataset.__getitems__(keys_for(k, 64, first_seed=999_999))
    assert not torch.equal(first["target"][:, :4, :4], other["target"][:, :4, :4])


def test_collate_of_single_items_equals_the_batch():
    task = L.make_task()
    dataset = task.train_dataset()
    keys = keys_for(task.default_knobs(), 12)
    batch = task.collate(dataset.__getitems__(keys))
    stacked = task.collate([dataset[key] for key in keys])
    for name in batch:
        assert torch.equal(batch[name], stacked[name])


def test_data_loader_workers_give_the_same_batches():
    task = L.make_task()
    dataset = task.train_dataset()
    batches = [keys_for(task.default_knobs(), 16, first_seed=100 * b) for b in range(4)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=task.collate, num_workers=2, multiprocessing_context="fork"
    )
    for keys, got in zip(batches, loader):
        assert torch.equal(got["tokens"], dataset.__getitems__(keys)["tokens"])


def test_knobs_pick_sizes_and_modes():
    k = knobs(sizes=[3, 9], modes=["NEGATIVE"])
    batch = L.LatinDataset(10, knobs()).__getitems__(keys_for(k, 64))
    assert set(batch["size"].tolist()) == {3, 9}
    assert (batch["mode"] == L.Mode.NEGATIVE).all()
    values = batch["target"][batch["target"] != L.PAD] - L.VALUE_OFFSET
    assert values.min() == -4 and values.max() == 4  # n=9 NEGATIVE: -4..4


def test_keys_with_different_knobs_in_one_batch():
    keys = keys_for(knobs(sizes=[3], modes=["STANDARD"]), 4) + keys_for(knobs(sizes=[8], modes=["ZERO_INCLUSIVE"]), 4)
    batch = L.LatinDataset(10, knobs()).__getitems__(keys)
    assert batch["size"].tolist() == [3] * 4 + [8] * 4
    assert batch["mode"].tolist() == [L.Mode.STANDARD] * 4 + [L.Mode.ZERO_INCLUSIVE] * 4
    assert batch["tokens"].shape == (8, 8, 8)


def test_bad_knobs_are_rejected():
    task = L.make_task()
    for bad in ({"sizes": [2]}, {"modes": ["ROMAN"]}, {"fill_min": 0.8, "fill_max": 0.2}, {"sizes": []}):
        with pytest.raises(ValueError):
            task.set_knobs(bad)
    task.set_knobs({"sizes": [7]})
    assert task.knobs["sizes"] == [7]


# ------------------------------------------------------------------------------ checking, decoding


def one_puzzle():
    """A 4x4 STANDARD puzzle whose hidden cells form an intercalate: two valid completions."""
    square = torch.from_numpy(L.cyclic_square(4)) + 1 + L.VALUE_OFFSET  # values 1..4
    tokens = square.clone()
    hidden = [(0, 0), (0, 2), (2, 0), (2, 2)]  # symbols 1 3 / 3 1: swapping them stays Latin
    for r, c in hidden:
        tokens[r, c] = L.EMPTY
    return tokens[None], square[None], torch.tensor([4]), torch.tensor([int(L.Mode.STANDARD)])


def test_validity_checker_accepts_alternatives_and_rejects_errors():
    tokens, target, size, mode = one_puzzle()
    assert L.is_valid_completion(target, tokens, size, mode).item()
    alternative = target.clone()
    alternative[0, 0, 0], alternative[0, 0, 2] = target[0, 0, 2], target[0, 0, 0]
    alternative[0, 2, 0], alternative[0, 2, 2] = target[0, 2, 2], target[0, 2, 0]
    assert not torch.equal(alternative, target)
    assert L.is_valid_completion(alternative, tokens, size, mode).item()

    duplicate = target.clone()
    duplicate[0, 0, 0] = target[0, 0, 1]
    assert L.latin_violations(duplicate).item() == 2  # one repeat in a row, one in a column
    assert not L.is_valid_completion(duplicate, tokens, size, mode).item()
    clue_changed = alternative.clone()
    clue_changed[0, 1], clue_changed[0, 3] = alternative[0, 3].clone(), alternative[0, 1].clone()  # swap rows
    assert L.latin_violations(clue_changed).item() == 0
    assert not L.is_valid_completion(clue_changed, tokens, size, mode).item()
    no_clues = torch.full_like(tokens, L.EMPTY)
    assert L.is_valid_completion(target, no_clues, size, mode).item()
    wrong_symbols = target - 1  # a Latin square over 0..3: not the STANDARD symbols
    assert L.latin_violations(wrong_symbols).item() == 0
    assert not L.is_valid_completion(wrong_symbols, no_clues, size, mode).item()
    assert L.is_valid_completion(wrong_symbols, no_clues, size, torch.tensor([int(L.Mode.ZERO_INCLUSIVE)])).item()
    unfinished = target.clone()
    unfinished[0, 0, 0] = L.EMPTY
    assert not L.is_valid_completion(unfinished, tokens, size, mode).item()


def oracle(solutions: torch.Tensor):
    """A 'model' whose logits put (almost) everything on the solution its input grid agrees with."""

    def logits(tokens, size, mode):
        agrees = ((tokens[:, None] == solutions[None]) | (tokens[:, None] == L.EMPTY)).all(3).all(2)
        assert (agrees.sum(1) == 1).all(), "each grid must match exactly one solution"
        solution = solutions[agrees.int().argmax(1)]
        out = torch.full((*tokens.shape, L.VOCAB_SIZE), -10.0)
        return out.scatter_(-1, solution.unsqueeze(-1), 5.0 + torch.rand(solution.shape).unsqueeze(-1))

    return logits


def test_iterative_decoding_of_the_solution_is_always_valid():
    k = knobs(sizes=[4, 5, 6], fill_min=0.3, fill_max=0.8)
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 32))
    calls = []

    def counted(tokens, size, mode):
        calls.append(int((tokens == L.EMPTY).sum()))
        return oracle(batch["target"])(tokens, size, mode)

    decoded = L.decode_iterative(counted, batch["tokens"], batch["size"], batch["mode"], stop_when_valid=False)
    assert torch.equal(decoded, batch["target"])
    assert L.is_valid_completion(decoded, batch["tokens"], batch["size"], batch["mode"]).all()
    hidden = (batch["tokens"] == L.EMPTY).sum((1, 2))
    assert len(calls) == int(hidden.max())  # one cell per grid per pass
    assert calls[1] == calls[0] - int((hidden > 0).sum())
    calls.clear()
    assert torch.equal(L.decode_iterative(counted, batch["tokens"], batch["size"], batch["mode"]), batch["target"])
    assert len(calls) == 1  # the argmax completion is valid at once
    calls.clear()
    first = oracle(batch["target"])(batch["tokens"], batch["size"], batch["mode"])
    args = (batch["tokens"], batch["size"], batch["mode"])
    assert torch.equal(L.decode_iterative(counted, *args, stop_when_valid=False, logits=first), batch["target"])
    assert len(calls) == int(hidden.max()) - 1  # given logits are the first pass


def test_iterative_decoding_keeps_full_grids_and_clues():
    k = knobs(sizes=[5], fill_min=0.5, fill_max=0.5)
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 8))
    tokens = batch["tokens"].clone()
    tokens[0] = batch["target"][0]  # nothing hidden

    def uniform(t, s, m):
        return torch.zeros(*t.shape, L.VOCAB_SIZE).masked_fill(~L.allowed_tokens()[m, s][:, None, None], float("-inf"))

    decoded = L.decode_iterative(uniform, tokens, batch["size"], batch["mode"])
    assert torch.equal(decoded[0], batch["target"][0])
    shown = tokens != L.EMPTY
    assert torch.equal(decoded[shown], tokens[shown]) and not (decoded == L.EMPTY).any()


def test_iterative_decoding_fills_the_most_confident_cell_first():
    tokens, target, size, mode = one_puzzle()
    seen = []

    def model(t, s, m):
        seen.append(t.clone())
        out = torch.full((*t.shape, L.VOCAB_SIZE), 0.0)
        out[..., target[0, 2, 2]] = 1.0
        out[0, 2, 2, target[0, 2, 2]] = 9.0  # (2, 2) is the sure one
        return out

    L.decode_iterative(model, tokens, size, mode, stop_when_valid=False)
    assert seen[1][0, 2, 2] == target[0, 2, 2] and (seen[1] == L.EMPTY).sum() == 3


def reference_decode(model, tokens, size, mode):
    """Iterative decoding as first specified, written plainly: every unfinished grid goes through
    the model each pass; a grid whose argmax completion is valid takes it, else its most confident
    hidden cell is filled. Returns the grids and the number of grid-passes."""
    tokens = tokens.clone()
    finished = ~(tokens == L.EMPTY).any(2).any(1)
    passes = 0
    while not finished.all():
        idx = (~finished).nonzero().flatten()
        grid = tokens[idx]
        hidden = grid == L.EMPTY
        confidence, choice = model(grid, size[idx], mode[idx]).softmax(-1).max(-1)
        passes += len(idx)
        completion = torch.where(hidden, choice, grid)
        valid = L.is_valid_completion(completion, grid, size[idx], mode[idx])
        for j, i in enumerate(idx.tolist()):
            if valid[j]:
                tokens[i], finished[i] = completion[j], True
                continue
            cell = confidence[j].masked_fill(~hidden[j], -1.0).flatten().argmax()
            tokens[i].view(-1)[cell] = choice[j].view(-1)[cell]
            finished[i] = not (tokens[i] == L.EMPTY).any()
    return tokens, passes


def seeded_solver(n=5, count=40, fill=0.4):
    """Fixed puzzles and a seeded (untrained, sharpened) LatinTransformer pulled towards their solutions:
    a fixed function of the grid that solves some puzzles and fails others, one-shot and iteratively."""
    torch.manual_seed(0)
    model = L.LatinTransformer(32, 2, 2).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(10.0)
    puzzles = L.make_puzzles(L.as_seeds(range(count)), np.full(count, n), np.arange(count) % 3, np.full(count, fill))
    clue = puzzles["tokens"] != L.EMPTY
    calls = []

    def solver(tokens, size, mode):
        calls.append(len(tokens))
        match = ((tokens[:, None] == puzzles["tokens"][None]) | ~clue[None]).all(3).all(2)
        assert (match.sum(1) == 1).all()
        solution = puzzles["target"][match.int().argmax(1)]
        return model(tokens, size, mode) + 3.0 * F.one_hot(solution, L.VOCAB_SIZE)

    return solver, puzzles, calls


def test_giving_up_leaves_valid_iter_as_the_reference_decoding_has_it():
    solver, puzzles, calls = seeded_solver()
    args = puzzles["tokens"], puzzles["size"], puzzles["mode"]
    expected, reference_passes = reference_decode(solver, *args)
    reference_valid = L.is_valid_completion(expected, *args)
    assert 0.2 < reference_valid.float().mean() < 0.8  # a test of both outcomes
    calls.clear()
    assert torch.equal(L.decode_iterative(solver, *args), expected)  # as before: the same grids
    calls.clear()
    decoded = L.decode_iterative(solver, *args, give_up=True)
    assert torch.equal(L.is_valid_completion(decoded, *args), reference_valid)
    assert sum(calls) <= reference_passes
    assert torch.equal(decoded[reference_valid], expected[reference_valid])  # solved the same way
    # An untrained model fills cells that clash at once: those grids stop after a pass or two.
    torch.manual_seed(1)
    model = L.LatinTransformer(32, 2, 2).eval()
    expected, reference_passes = reference_decode(model, *args)
    passes = []
    model.register_forward_hook(lambda module, inputs, out: passes.append(len(inputs[0])))
    decoded = L.decode_iterative(model, *args, give_up=True)
    assert torch.equal(L.is_valid_completion(decoded, *args), L.is_valid_completion(expected, *args))
    assert sum(passes) < reference_passes / 4


def test_fast_decoding_fills_several_cells_per_pass_and_only_stops_valid_or_stuck():
    solver, puzzles, calls = seeded_solver()
    args = puzzles["tokens"], puzzles["size"], puzzles["mode"]
    decoded = L.decode_fast(solver, *args)
    valid = L.is_valid_completion(decoded, *args)
    _, reference_passes = reference_decode(solver, *args)
    calls.clear()
    decoded = L.decode_fast(solver, *args)
    assert sum(calls) < reference_passes
    shown = args[0] != L.EMPTY
    assert torch.equal(decoded[shown], args[0][shown])
    stopped = ~valid
    # A grid that did not end valid stopped because its filled cells cannot be completed, or it is full.
    s, m = args[1][stopped], args[2][stopped]
    assert (L.cannot_complete(decoded[stopped], s, m) | ~(decoded[stopped] == L.EMPTY).any(2).any(1)).all()
    assert valid.float().mean() > 0.2
    # The oracle's predictions are all sure and consistent: one pass fills every grid.
    k = knobs(sizes=[6], fill_min=0.3, fill_max=0.3)
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 16))
    passes = []

    def sure(tokens, size, mode):
        passes.append(len(tokens))
        return oracle(batch["target"])(tokens, size, mode)

    out = L.decode_fast(sure, batch["tokens"], batch["size"], batch["mode"])
    assert torch.equal(out, batch["target"]) and passes == [16]


def test_test_time_views_map_predictions_back_to_the_grid():
    k = knobs(sizes=[4, 6], fill_min=0.5, fill_max=0.5)
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 12))
    tokens, target, size, mode = (batch[name] for name in L.BATCH_KEYS)
    views = L.tta_views(len(tokens), size, tokens.shape[-1], 3)
    assert torch.equal(views, L.tta_views(len(tokens), size, tokens.shape[-1], 3))  # fixed per grid
    assert not torch.equal(views[:, 0], views[:, 1])
    for i, n in enumerate(size.tolist()):  # permutations of 0..n-1, padding left in place
        assert (views[i, :, :, :n].sort(-1).values == torch.arange(n)).all()
        assert (views[i, :, :, n:] == torch.arange(n, tokens.shape[-1])).all()
    seen = []

    def echo(grid, n, m):  # "predicts" each cell's own token: equivariant under any isotopism
        seen.append(grid)
        return 10.0 * F.one_hot(grid, L.VOCAB_SIZE).float()

    averaged = L.tta_logits(echo, tokens, size, mode, views)
    assert torch.equal(averaged, echo(tokens, size, mode))
    isotopes = seen[0][len(tokens):]
    seen.clear()
    solved = L.tta_logits(echo, target, size, mode, views)
    assert torch.equal(solved.argmax(-1), target)
    no_clues = torch.full_like(target, L.EMPTY)
    for v in range(3):  # each view of a puzzle is a puzzle of its solution's isotope
        solution = seen[0][(v + 1) * len(tokens) : (v + 2) * len(tokens)]
        puzzle = isotopes[v * len(tokens) : (v + 1) * len(tokens)]
        assert torch.equal((puzzle == L.EMPTY).sum((1, 2)), (tokens == L.EMPTY).sum((1, 2)))
        assert L.is_valid_completion(solution, no_clues, size, mode).all()  # a Latin square, same symbols
        assert L.is_valid_completion(solution, puzzle, size, mode).all()  # and the puzzle's view keeps to it


# ------------------------------------------------------------------------------ model, loss, validate


def tiny_task(**overrides) -> L.LatinTask:
    options = dict(d_model=32, layers=2, heads=2, size_min=4, size_max=4, val_sizes=[4, 5], val_puzzles=16)
    return L.make_task(L.LatinOptions(**{**options, **overrides}))


def test_model_masks_symbols_and_padding():
    task = tiny_task()
    torch.manual_seed(0)
    model = task.build_model().eval()
    k = knobs(sizes=[3, 6], modes=ALL_MODES)
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 16))
    with torch.no_grad():
        logits = model(batch["tokens"], batch["size"], batch["mode"])
    allowed = torch.isfinite(logits)
    for i in range(16):
        n, mode = batch["size"][i].item(), batch["mode"][i].item()
        symbols = {v + L.VALUE_OFFSET for v in L.symbol_values(n, mode)}
        assert set(allowed[i, 0, 0].nonzero().flatten().tolist()) == symbols
        if n < 6:
            assert allowed[i, n, n].nonzero().flatten().tolist() == [L.PAD]


def test_padding_does_not_change_predictions():
    task = tiny_task()
    torch.manual_seed(0)
    model = task.build_model().eval()
    small = L.LatinDataset(10, knobs(sizes=[4])).__getitems__(keys_for(knobs(sizes=[4]), 3))
    large = L.LatinDataset(10, knobs(sizes=[7])).__getitems__(keys_for(knobs(sizes=[7]), 3, first_seed=7))
    mixed = L.pad_cat([small, large])
    with torch.no_grad():
        together = model(mixed["tokens"], mixed["size"], mixed["mode"])
        apart = model(small["tokens"], small["size"], small["mode"])
    torch.testing.assert_close(together[:3, :4, :4], apart, rtol=1e-4, atol=1e-5)


def test_checkpointed_blocks_give_the_same_gradients():
    task = tiny_task()
    torch.manual_seed(0)
    model = task.build_model()
    blocks = task.checkpoint_blocks(model)
    assert len(blocks) == 2 and all(isinstance(b, torch.nn.Module) for b in blocks)
    k = knobs(sizes=[3, 5])
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 8))
    task.loss(model, batch).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    forwards = [b.forward for b in blocks]
    for block, forward in zip(blocks, forwards):
        block.forward = lambda x, f=forward: checkpoint(f, x, use_reentrant=False)
    task.loss(model, batch).backward()
    for before, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, before, rtol=1e-4, atol=1e-6)


def test_tiny_model_learns():
    task = tiny_task()
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = task.collate(task.train_dataset().__getitems__(keys_for(task.default_knobs(), 16)))
    losses = []
    for _ in range(40):  # one batch, seen again and again: the loss must fall
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(4)) < 0.1  # uniform over the 4 allowed symbols at first
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])


def test_loss_counts_hidden_cells_only():
    task = tiny_task()
    model = task.build_model()
    k = knobs(sizes=[4], fill_min=1.0, fill_max=1.0)  # nothing hidden: nothing to learn, no NaN
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 4))
    assert task.loss(model, batch).item() == 0.0


def test_validate_returns_every_metric():
    task = tiny_task()
    model = task.build_model().eval()
    metrics = task.validate(model, torch.device("cpu"))
    names = ["cell_acc", "valid_oneshot", "valid_iter", "violations", "confidence", "entropy", "loss"]
    expected = {f"{m}/n{n}" for m in names for n in (4, 5)} | {"cell_acc", "valid_iter", "valid_oneshot", "loss"}
    assert expected <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["cell_acc"] <= 1.0 and metrics["entropy/n5"] > 0
    assert task.validate(model, torch.device("cpu")) == metrics  # a fixed held-out set


def test_validation_set_is_fixed_and_half_revealed():
    task = tiny_task(val_puzzles=6)
    val = task.validation_set()
    assert sorted(val) == [4, 5]
    assert (val[5]["tokens"] != L.EMPTY).sum((1, 2)).tolist() == [13] * 6
    assert set(val[5]["mode"].tolist()) == {0, 1, 2}
    assert torch.equal(tiny_task(val_puzzles=6).validation_set()[5]["target"], val[5]["target"])


def test_validation_reports_fill_and_mode_groups_and_exact_grids():
    task = tiny_task(val_sizes=[4], val_fill=[0.3, 0.8], val_puzzles=12, val_fast=True)
    targets = task.validation_puzzles(4)["target"]

    def solves_standard(tokens, size, mode):  # the solution for STANDARD grids, no clue otherwise
        allowed = L.allowed_tokens()[mode, size][:, None, None]
        out = torch.zeros(*tokens.shape, L.VOCAB_SIZE).masked_fill(~allowed, float("-inf"))
        standard = mode == L.Mode.STANDARD
        if standard.any():
            out[standard] = oracle(targets)(tokens[standard], size[standard], mode[standard])
        return out

    metrics = task.validate(solves_standard, torch.device("cpu"))
    assert metrics["valid_iter/STANDARD"] == 1.0 and metrics["exact_iter/STANDARD"] == 1.0
    assert metrics["valid_oneshot/NEGATIVE"] == 0.0 and metrics["exact_oneshot/ZERO_INCLUSIVE"] == 0.0
    for name in ("valid_iter", "valid_oneshot", "violations", "exact_iter", "valid_fast"):
        assert metrics[f"{name}/fill30"] + metrics[f"{name}/fill80"] == pytest.approx(2 * metrics[name])
        thirds = sum(metrics[f"{name}/{mode}"] for mode in ALL_MODES)
        assert thirds == pytest.approx(3 * metrics[name])
    shown = (task.validation_puzzles(4)["tokens"] != L.EMPTY).sum((1, 2)).tolist()
    assert sorted(set(shown)) == [5, 13]  # floor(0.3 * 16 + 1/2), floor(0.8 * 16 + 1/2)
    assert metrics["cell_acc/STANDARD"] == 1.0
    single = tiny_task(val_sizes=[4], val_puzzles=6, modes=["STANDARD"])
    plain = single.validate(single.build_model().eval(), torch.device("cpu"))
    assert not any("/fill" in k or "/STANDARD" in k for k in plain)  # one fill, one mode: no groups


def test_exact_match_tells_the_generated_solution_from_other_valid_ones():
    tokens, target, size, mode = one_puzzle()
    alternative = target.clone()
    for r, c in [(0, 0), (0, 2), (2, 0), (2, 2)]:
        alternative[0, r, c] = target[0, r, 2 - c]  # the intercalate swapped: another valid completion
    batch = {"tokens": tokens, "target": target, "size": size, "mode": mode}
    for solution, exact in ((target, 1.0), (alternative, 0.0)):
        scores = L.grid_scores(oracle(solution), batch, torch.device("cpu"))
        assert scores["valid_iter"].item() == 1.0 and scores["valid_oneshot"].item() == 1.0
        assert scores["exact_iter"].item() == exact and scores["exact_oneshot"].item() == exact


def test_validation_follows_the_sizes_the_knobs_train():
    task = tiny_task(val_puzzles=6)
    model = task.build_model().eval()
    before = task.validate(model, torch.device("cpu"))
    four = task.validation_puzzles(4)
    task.set_knobs({"sizes": [4, 7]})  # a curriculum moves on
    assert task.validation_sizes() == [4, 5, 7]
    after = task.validate(model, torch.device("cpu"))
    assert "valid_iter/n7" in after and "valid_iter/n7" not in before
    assert after["loss"] == before["loss"] == pytest.approx((after["loss/n4"] + after["loss/n5"]) / 2)
    assert task.validation_puzzles(4) is four and task.validation_puzzles(7) is task.validation_puzzles(7)


class Uniform(torch.nn.Module):
    """Equal logits for every symbol a cell may hold."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, tokens, size, mode):
        allowed = L.allowed_tokens()[mode, size][:, None, None]
        return (self.scale * torch.zeros(*tokens.shape, L.VOCAB_SIZE)).masked_fill(~allowed, float("-inf"))


def test_loss_knobs_focal_and_constraint():
    task = tiny_task()
    torch.manual_seed(0)
    model = task.build_model()
    k = knobs(sizes=[4, 5])
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 8))
    hidden = batch["tokens"] == L.EMPTY
    logits = model(batch["tokens"], batch["size"], batch["mode"])
    cross_entropy = F.cross_entropy(logits[hidden], batch["target"][hidden])
    as_before = F.cross_entropy(
        logits.flatten(0, 2), batch["target"].masked_fill(~hidden, -100).flatten(), reduction="sum"
    ) / hidden.sum()
    assert torch.equal(task.loss(model, batch), as_before)  # the knobs at 0: the loss as it always was
    task.set_knobs({"focal_gamma": 2.0})
    p = logits[hidden].softmax(-1).gather(1, batch["target"][hidden][:, None]).squeeze(1)
    torch.testing.assert_close(task.loss(model, batch), (-(1 - p) ** 2 * p.log()).mean())
    assert task.loss(model, batch) < cross_entropy

    # Uniform over 4 symbols, four hidden cells forming an intercalate: each hidden cell expects
    # the four clues of its row and column plus 1/4 of each of its two hidden neighbours' symbols
    # to repeat one of its own: (4 + 2) / 4 = 1.5, on top of cross-entropy log 4.
    tokens, target, size, mode = one_puzzle()
    one = {"tokens": tokens, "target": target, "size": size, "mode": mode}
    task.set_knobs({"focal_gamma": 0.0, "constraint_weight": 0.5})
    torch.testing.assert_close(task.loss(Uniform(), one), torch.tensor(math.log(4) + 0.5 * 1.5))
    task.set_knobs({"constraint_weight": 1.0})
    sure = task.loss(lambda_module(oracle(target)), one)
    assert sure.item() < 1e-4  # the solution, held with certainty: nothing repeats
    loss = task.loss(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    for bad in ({"focal_gamma": -1}, {"constraint_weight": "big"}, {"constraint_weight": True}):
        with pytest.raises(ValueError):
            task.set_knobs(bad)
    assert tiny_task(focal_gamma=1.5, constraint_weight=0.2).default_knobs()["focal_gamma"] == 1.5


def lambda_module(fn):
    """A callable as an nn.Module with one (unused) parameter, so that task.loss finds a device."""

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, tokens, size, mode):
            return fn(tokens, size, mode) * 10.0

    return Wrapped()


def test_example_input_is_what_the_model_takes():
    task = tiny_task(size_max=5)
    tokens, size, mode = task.example_input()
    assert tokens.shape == (2, 5, 5) and tokens.dtype == size.dtype == mode.dtype == torch.int64
    assert (tokens == L.EMPTY).any() and size.tolist() == [5, 5]
    logits = task.build_model().eval()(*task.example_input())
    assert logits.shape == (2, 5, 5, L.VOCAB_SIZE)
    assert torch.equal(task.example_input(3)[0][:2], tokens)


def dynamic_export_shapes():
    """Batch and grid size free: what an exported Latin model must take."""
    batch, n = torch.export.Dim("batch"), torch.export.Dim("n", min=3, max=L.MAX_SIZE)
    return ({0: batch, 1: n, 2: n}, {0: batch}, {0: batch})


def test_the_model_exports_with_free_batch_and_grid_size():
    task = tiny_task(size_max=6)
    torch.manual_seed(0)
    model = task.build_model().eval()
    program = torch.export.export(model, task.example_input(), dynamic_shapes=dynamic_export_shapes())
    k = knobs(sizes=[3, 8])
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 5))  # another batch size, padded sizes
    args = (batch["tokens"], batch["size"], batch["mode"])
    torch.testing.assert_close(program.module()(*args), model(*args))


def test_the_model_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnx export check: pip install onnx onnxscript onnxruntime")
    pytest.importorskip("onnxscript")
    task = tiny_task(size_max=6)
    torch.manual_seed(0)
    model = task.build_model().eval()
    path = tmp_path / "latin.onnx"
    torch.onnx.export(
        model, task.example_input(), path, dynamo=True, input_names=["tokens", "size", "mode"],
        output_names=["logits"], dynamic_shapes=dynamic_export_shapes(),
    )
    k = knobs(sizes=[3, 8])
    batch = L.LatinDataset(10, k).__getitems__(keys_for(k, 5))
    feeds = {name: batch[key].numpy() for name, key in (("tokens", "tokens"), ("size", "size"), ("mode", "mode"))}
    (got,) = ort.InferenceSession(str(path)).run(None, feeds)
    expected = model(batch["tokens"], batch["size"], batch["mode"]).detach().numpy()
    assert (np.isinf(got) == np.isinf(expected)).all()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ task surface


def test_task_follows_the_protocol():
    task = L.make_task()
    assert isinstance(task, Task) and task.name == "latin"
    assert L.make_task.Options is L.LatinOptions
    defaults = task.config_defaults()
    for key in (
        "batch_size",
        "optimizer.lr",
        "schedule.warmup_steps",
        "val_every",
        "log_every",
        "checkpoint.every_steps",
        "checkpoint.best_metric",
    ):
        assert key in defaults
    assert "epochs" in defaults or "max_steps" in defaults
    assert set(task.default_knobs()) == {"sizes", "modes", "fill_min", "fill_max", "focal_gamma", "constraint_weight"}


def test_options_are_checked():
    with pytest.raises(pydantic.ValidationError):
        L.LatinOptions(colour="red")
    with pytest.raises(pydantic.ValidationError):
        L.LatinOptions(size_min=7, size_max=5)
    with pytest.raises(pydantic.ValidationError):
        L.LatinOptions(modes=["ROMAN"])
    with pytest.raises(pydantic.ValidationError):
        L.LatinOptions(d_model=100, heads=3)
