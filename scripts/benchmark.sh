#!/usr/bin/env bash
# Regenerates every table of the README's "Results on the embedded benchmark" section.
# Each `fcit compare` writes runs/<name>/table.md (paste it into the README) and a run directory per (method, seed).
# Wall times on the 2-core reference machine are in the README next to each table. Extra flags for every
# `fcit compare` can be given in FCIT_ARGS, e.g. FCIT_ARGS="--set threads=1" to run two parts side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
FCIT=${FCIT:-.venv/bin/fcit}
SEEDS=${SEEDS:-0,1,2}
part=${1:-all}

if [[ $part == all || $part == core ]]; then      # issue: training core: Zero-shot / Finetune / MTL
  $FCIT compare --quiet ${FCIT_ARGS:-} --methods zeroshot,finetune,mtl --seeds "$SEEDS" --out runs/bench-core
fi
if [[ $part == all || $part == disco ]]; then     # DISCO vs Finetune, Hom and Het
  $FCIT compare --quiet ${FCIT_ARGS:-} --methods disco --seeds "$SEEDS" --out runs/bench-disco-hom
  .venv/bin/python scripts/disco_activation_ablation.py runs/bench-disco-hom/disco-s0
  $FCIT compare --quiet ${FCIT_ARGS:-} --methods finetune,disco --seeds "${HET_SEEDS:-$SEEDS}" --set scenario.mode=het \
    --out runs/bench-disco-het
fi
if [[ $part == all || $part == baselines ]]; then # the comparison set
  $FCIT compare --quiet ${FCIT_ARGS:-} --methods ewc,lwf,olora,mlora,moelora --seeds "$SEEDS" --out runs/bench-baselines
fi
if [[ $part == all || $part == optimizers ]]; then
  $FCIT compare --quiet ${FCIT_ARGS:-} --methods disco --aggregators fedavg,fedavgm,fedadam,fedadagrad,fedyogi --seeds "$SEEDS" \
    --out runs/bench-optimizers
fi
if [[ $part == all || $part == ablation ]]; then  # DISCO identity ablation (activation: see the disco part)
  for id in image text+image; do
    $FCIT compare --quiet ${FCIT_ARGS:-} --methods disco --seeds "$SEEDS" --set method.params.identity=$id --out runs/bench-ablation-id-$id
  done
fi
if [[ $part == all || $part == ssa ]]; then
  .venv/bin/python scripts/bench_ssa.py
fi
