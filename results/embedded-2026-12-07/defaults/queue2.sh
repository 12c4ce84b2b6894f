#!/usr/bin/env bash
# after flip-queue.sh: three more rates at seed 0, then each server optimizer's best seed-0 rate at seeds 0-2
set -uo pipefail
cd /work/main
while pgrep -f "bash runs/flip-queue.sh" >/dev/null; do sleep 10; done
F=.venv/bin/fcit
opt() { echo "== $(date -u +%T) $1 $2 seeds $3"; $F compare --quiet --set model.compute_dtype=float32 --methods disco --aggregators "$1" \
  --set federation.server_lr="$2" --set federation.beta1=0.5 --seeds "$3" --out "runs/bench-optimizers-beta0.5-$1-lr$2"; echo "== $(date -u +%T) done rc=$?"; }
opt fedadam 0.001 0; opt fedyogi 0.001 0; opt fedadagrad 0.1 0
best=$(.venv/bin/python - <<'PY'
import json, glob, re
best = {}
for p in glob.glob("runs/bench-optimizers-beta0.5-*-lr*/disco-s0/metrics.json"):
    agg, lr = re.search(r"beta0\.5-(\w+)-lr([\d.]+)/", p).groups()
    last = json.load(open(p))["summary"]["last"]
    if agg not in best or last > best[agg][1]:
        best[agg] = (lr, last)
print(" ".join(f"{a}:{lr}" for a, (lr, _) in sorted(best.items())))
PY
)
echo "== best at seed 0: $best"
for spec in $best; do opt "${spec%%:*}" "${spec##*:}" 0,1,2; done
echo "== $(date -u +%T) queue2 end"
