#!/usr/bin/env bash
# issue 16's flip: the tables on the new defaults (the replay base as the embedded base, v5, projector frozen), fp32
set -uo pipefail
cd /work/main
F=.venv/bin/fcit
NEW=(--set data.synth.version=5 --set model.train_projector=false --set model.compute_dtype=float32)
cmp() { echo "== $(date -u +%T) $*"; $F compare --quiet "${NEW[@]}" "$@"; echo "== $(date -u +%T) done rc=$?"; }
cmp --methods finetune --seeds 0 --out runs/bench-hom
cmp --methods finetune,disco --seeds 0,1,2 --set scenario.mode=het --out runs/bench-het
for id in image text+image; do cmp --methods disco --seeds 0 --set method.params.identity=$id --out runs/bench-ablation-id-$id; done
echo "== $(date -u +%T) activation"; .venv/bin/python scripts/disco_activation_ablation.py runs/combo-bs16/disco-s{0,1,2}; echo "== $(date -u +%T) done"
for lam in 10000 100000; do cmp --methods ewc --seeds 0 --set method.params.lambda=$lam --out runs/bench-ewc-lambda-$lam; done
cmp --methods lwf --seeds 0 --set method.params.alpha=10 --out runs/bench-lwf-alpha-10
cmp --methods olora --seeds 0 --set method.params.lambda=5 --out runs/bench-olora-lambda-5
cmp --methods finetune,disco --seeds 0 --set scenario.rounds=20 --out runs/bench-budget-rounds20
BEST="fedavgm:1.0 fedadagrad:0.03 fedadam:0.003 fedyogi:0.003"
for spec in fedavgm:0.5 fedavgm:1.0 fedadagrad:0.01 fedadagrad:0.03 fedadam:0.003 fedadam:0.01 fedyogi:0.003 fedyogi:0.01; do
  cmp --methods disco --aggregators "${spec%%:*}" --set federation.server_lr="${spec##*:}" --set federation.beta1=0.5 --seeds 0 --out "runs/bench-optimizers-beta0.5-${spec%%:*}-lr${spec##*:}"
done
echo "== $(date -u +%T) queue end"
