#!/usr/bin/env bash
# A/B runs of the 9 x 9 recipe (docs/tasks/latin.md): each arm changes one thing, at the recipe's
# length (3000 steps, about 18 CPU-minutes each with one thread), then compares and plots them.
#
#     recipes/latin-9x9-ab.sh [OUT_DIR [RUN OPTIONS...]]   # default runs/ab; two arms at a time (2 cores)
#     recipes/latin-9x9-ab.sh runs/ab-seed1 --seed 1        # the options go to every arm
#
# TTA is measured on the recipe's final model with `kktrain validate -o task.tta=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
KK=${KK:-.venv/bin/kktrain}
OUT=${1:-runs/ab}
shift $(( $# > 0 ? 1 : 0 ))
EXTRA=("$@")
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

arm() {  # arm NAME [run options...]
    local name=$1; shift
    "$KK" run --config recipes/latin-9x9.toml --out "$OUT/$name" --quiet "$@" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/$name.log" 2>&1
}

arm recipe & arm no-constraint -o task.constraint_weight=0 & wait
arm ema --plugin ema & arm curriculum --plugin curriculum -o curriculum.file=recipes/latin-9x9-fill-curriculum.toml & wait
arm focal -o task.focal_gamma=1 &
"$KK" validate "$OUT/recipe" --json -o task.tta=4 > "$OUT/recipe-tta4.json" & wait

"$KK" compare "$OUT/recipe" "$OUT/no-constraint" "$OUT/ema" "$OUT/curriculum" "$OUT/focal"
"$KK" plot "$OUT/recipe" "$OUT/no-constraint" "$OUT/ema" "$OUT/curriculum" "$OUT/focal" \
    --x time --metric val/valid_iter --out "$OUT/ab.png"
cat "$OUT/recipe-tta4.json"
