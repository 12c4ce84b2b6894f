#!/usr/bin/env bash
# Run as: bash results/embedded-2026-12-07/batch-speed/run.sh (needs runs/base-replay: bash scripts/benchmark.sh combo-bs16 builds it); out.txt is its output
# The default `fcit run` (Finetune, bf16 matmuls on this CPU) against the candidate defaults at batch 16, 8 and 4, one after the other
# ("default" was FCIT-Synth v4 on the two-phase base when this ran, 2026-12-07 18:24 UTC; cand-bs16 is today's default)
set -u
cd "$(dirname "$0")/../../.."  # the repository root
rm -rf runs/speed-bs
C=(--set model.path=runs/base-replay --set data.synth.version=5 --set model.train_projector=false)
t() { local name=$1; shift; local s=$(date +%s.%N); .venv/bin/fcit run --quiet --out runs/speed-bs --name "$name" "$@" > runs/speed-bs-$name.log 2>&1; local e=$(date +%s.%N); echo "$name $(python3 -c "print(round($e-$s,1))") s  $(date -u +%H:%M)"; }
t default
t cand-bs16 "${C[@]}"
t cand-bs8 "${C[@]}" --set train.batch_size=8
t cand-bs4 "${C[@]}" --set train.batch_size=4
t default-again
