#!/usr/bin/env bash
# Regenerates the README's "The paper's evaluation matrix" section: the 12 cells (2 settings x 2 scenarios x 3 betas)
# for the paper's comparison set, 3 seeds at beta 1, zero-shot transfer and general-ability retention, DISCO's identity
# and gate ablations, and the findings report. Finished runs are reused and an interrupted part continues, so the
# parts can be run one at a time (`scripts/matrix.sh main`) and in any order after `main` (`identity` trains; the
# others only evaluate finished runs).
# JOBS runs at once, one thread each (2 on the project's 2-core machine); OUT names the main folder.
set -euo pipefail
cd "$(dirname "$0")/.."
FCIT=${FCIT:-.venv/bin/fcit}
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
OUT=${OUT:-runs/matrix}
METHODS=${METHODS:-zeroshot,finetune,olora,moelora,disco,mtl}
part=${1:-all}
# The tables are fp32 on every machine (model.compute_dtype=float32): the default, bf16 matmuls where the CPU has bf16
# units, would make a table's numbers depend on the machine that ran it, and the committed runs are fp32.
mx() { $FCIT matrix --quiet --set model.compute_dtype=float32 --jobs "$JOBS" ${FCIT_ARGS:-} "$@"; }

if [[ $part == all || $part == main ]]; then        # every cell at seed 0, then seeds 1 and 2 at beta 1
  mx --methods "$METHODS" --seeds 0 --out "$OUT"
  mx --methods "$METHODS" --betas 1 --seeds 0,1,2 --out "$OUT"
fi
if [[ $part == all || $part == transfer ]]; then    # findings (8) and (9), from the runs' final states: no retraining
  # (the centralized MTL keeps no final state; the capability setting leaves no dataset unseen)
  $PY scripts/transfer_eval.py $(ls -d "$OUT"/*-task-* | grep -v '/mtl-') --matrix-out "$OUT-transfer"
fi
if [[ $part == all || $part == identity ]]; then    # finding (5): DISCO on image identity tokens
  mx --methods disco --settings task --scenarios hom --betas 1 --seeds 0 --set method.params.identity=image \
    --out "$OUT-identity-image"
fi
if [[ $part == all || $part == gates ]]; then       # finding (6): the gate only changes inference, so no retraining
  $PY scripts/disco_activation_ablation.py "$OUT"/disco-task-hom-b1-s{0,1,2} --matrix-out "$OUT-gates"
fi
if [[ $part == all || $part == findings ]]; then
  $PY scripts/findings.py "$OUT" "$OUT-transfer" "$OUT-identity-image" "$OUT-gates" --markdown
fi
