#!/usr/bin/env bash
# Regenerates the tables of the README's "Results on the embedded benchmark" section and the measured runs of the
# investigations it links (docs/regime-investigation.md, docs/server-optimizers.md); the probes those name as outside
# the project's commands and the `fcit pretrain` runs of the binding bases are not in it (the v4, replay, wide and deep
# bases are: the parts that need them build them where runs/ lacks them).
# `core`, `disco`, `baselines`, `ewc-sweep`, `sweeps`, `optimizers`, `ablation` and `budget` run on the defaults (the
# replay base, FCIT-Synth v5, the projector frozen; 2026-12-07 on);
# the `v4-*` parts and the issue-16 lever parts (`combo`, `combo-bs16`, `sizes`) reproduce measurements made on or
# against the defaults before that: FCIT-Synth v4, the two-phase base, the projector trained (V4 below).
# Each `fcit compare` writes <folder>/table.md and a run directory per (method, seed); finished runs in a folder are
# reused, so the parts below share the Hom runs and an interrupted part continues where it stopped.
# Extra flags for every `fcit compare` go in FCIT_ARGS, e.g. FCIT_ARGS="--set threads=1" to run two parts side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
FCIT=${FCIT:-.venv/bin/fcit}
SEEDS=${SEEDS:-0,1,2}
part=${1:-all}
# The tables are fp32 on every machine (model.compute_dtype=float32): the default, bf16 matmuls where the CPU has bf16
# units, would make a table's numbers depend on the machine that ran it, and the committed runs are fp32.
cmp() { $FCIT compare --quiet --set model.compute_dtype=float32 ${FCIT_ARGS:-} "$@"; }
# base NAME PRETRAIN-ARGS...: builds runs/NAME with `fcit pretrain` unless runs/ already has it
base() { [[ -f runs/$1/fcit_pretrain.json ]] || $FCIT pretrain "${@:2}" --out "runs/$1"; }
# The base embedded until 2026-12-07 (phases 1 and 2, no replay): from git history where this is a checkout (the same
# bytes), else rebuilt by `fcit pretrain` (other weights of the same quality, README "Reproducing the embedded base").
V4_COMMIT=5f0be66
v4_base() {
  [[ -f runs/base-v4/fcit_pretrain.json ]] && return
  mkdir -p runs/base-v4
  if git cat-file -e "$V4_COMMIT:src/fcit/assets/tiny-llava/model.safetensors" 2>/dev/null; then
    git archive "$V4_COMMIT" src/fcit/assets/tiny-llava | tar -x -C runs/base-v4 --strip-components=4
  else
    $FCIT pretrain --replay-epochs 0 --out runs/base-v4
  fi
}
V4=(--set model.path=runs/base-v4 --set data.synth.version=4 --set model.train_projector=true)
cmp4() { v4_base; cmp "${V4[@]}" "$@"; }  # later --set flags override V4's
# The replay base (the v4 base's phase 2 continued with descriptions), which issue 16's lever parts ran on by path
# before it became the embedded base: a copy of the embedded one.
replay_base() { [[ -f runs/base-replay/fcit_pretrain.json ]] || { mkdir -p runs/base-replay && cp src/fcit/assets/tiny-llava/* runs/base-replay/; }; }
# issue 16's levers, opt-in before they became the defaults: FCIT-Synth v5 and the projector frozen, which cost no
# time (the `combo-bs16` part), and with batch 4 as well, the three levers of the `combo` and `sizes` parts
FREE_LEVERS=(--set data.synth.version=5 --set model.train_projector=false)
LEVERS=("${FREE_LEVERS[@]}" --set train.batch_size=4)

if [[ $part == v4-base ]]; then  # only the v4 base, for rerunning a v4 measurement by hand (docs/results-v4.md)
  v4_base
fi
if [[ $part == all || $part == core ]]; then       # the benchmark's range: Zero-shot / Finetune / MTL (both)
  cmp --methods zeroshot,finetune,mtl,mtl-fed --seeds "$SEEDS" --out runs/bench-hom
fi
if [[ $part == all || $part == disco ]]; then      # DISCO, Hom and Het, and the activation ablation
  cmp --methods disco --seeds "$SEEDS" --out runs/bench-hom
  .venv/bin/python scripts/disco_activation_ablation.py $(for s in ${SEEDS//,/ }; do echo runs/bench-hom/disco-s$s; done)
  cmp --methods finetune,disco --seeds "${HET_SEEDS:-$SEEDS}" --set scenario.mode=het --out runs/bench-het
fi
if [[ $part == all || $part == baselines ]]; then  # the whole comparison set in one table (reuses the runs above)
  cmp --methods zeroshot,finetune,ewc,lwf,olora,mlora,moelora,disco,mtl,mtl-fed --seeds "$SEEDS" --out runs/bench-hom
fi
if [[ $part == all || $part == ewc-sweep ]]; then  # EWC's lambda, seed 0 (1000 is the default)
  for lam in 1000 10000 100000; do
    cmp --methods ewc --seeds 0 --set method.params.lambda=$lam --out runs/bench-ewc-lambda-$lam
  done
fi
if [[ $part == all || $part == sweeps ]]; then     # LwF and O-LoRA at a 10x stronger regulariser, seed 0
  cmp --methods lwf --seeds 0 --set method.params.alpha=10 --out runs/bench-lwf-alpha-10
  cmp --methods olora --seeds 0 --set method.params.lambda=5 --out runs/bench-olora-lambda-5
fi
if [[ $part == all || $part == optimizers ]]; then # DISCO under each server optimizer at momentum 0.5 (at the papers' 0.9 none is within 5 points of FedAvg: the v4-* parts), a rate grid at seed 0, then each one's best (OPT_BEST, the grid's best at seed 0) at every seed; FedAvg's row is the comparison set's DISCO
  OPT_BEST=${OPT_BEST:-fedavgm:1.0 fedadagrad:0.03 fedadam:0.005 fedyogi:0.005}  # the grid's best, measured 2026-12-07
  for spec in ${OPT_GRID:-fedavgm:0.5 fedavgm:1.0 fedadagrad:0.01 fedadagrad:0.03 fedadagrad:0.1 fedadam:0.001 fedadam:0.003 fedadam:0.005 fedadam:0.01 fedyogi:0.001 fedyogi:0.003 fedyogi:0.005 fedyogi:0.01} $OPT_BEST; do
    agg=${spec%%:*} lr=${spec##*:}
    seeds=0; [[ " $OPT_BEST " == *" $spec "* ]] && seeds=$SEEDS
    cmp --methods disco --aggregators "$agg" --set federation.server_lr="$lr" --set federation.beta1=0.5 \
      --seeds "$seeds" --out "runs/bench-optimizers-beta0.5-$agg-lr$lr"
  done
fi
if [[ $part == all || $part == v4-optimizers ]]; then # DISCO under each server optimizer, on a grid of server rates (FedAvgM 0.1: at beta1 0.9 its steady step is FedAvg's)
  cmp4 --methods disco --aggregators fedavg --seeds "${OPT_SEEDS:-$SEEDS}" --out runs/v4/bench-optimizers
  for lr in ${AVGM_RATES:-0.1 0.5 1.0}; do
    cmp4 --methods disco --aggregators fedavgm --set federation.server_lr=$lr --seeds "${OPT_SEEDS:-$SEEDS}" \
      --out runs/v4/bench-optimizers-lr$lr
  done
  for lr in ${ADAPTIVE_RATES:-0.001 0.01 0.1}; do
    cmp4 --methods disco --aggregators fedadam,fedadagrad,fedyogi --set federation.server_lr=$lr \
      --seeds "${OPT_SEEDS:-$SEEDS}" --out runs/v4/bench-optimizers-lr$lr
  done
fi
if [[ $part == all || $part == v4-optimizers-tau ]]; then # FedAdam at Reddi et al.'s smaller tau and with the clients' projector ratio, FedAvgM at a lower momentum; seed 0
  for lr in ${TAU_RATES:-0.003 0.01}; do
    cmp4 --methods disco --aggregators fedadam --set federation.server_lr=$lr --set federation.adaptivity=1e-5 \
      --seeds "${OPT_SEEDS:-0}" --out runs/v4/bench-optimizers-tau1e-5-lr$lr
  done
  cmp4 --methods disco --aggregators fedavgm --set federation.server_lr=0.5 --set federation.beta1=0.5 \
    --seeds "${OPT_SEEDS:-0}" --out runs/v4/bench-optimizers-avgm-beta0.5-lr0.5
  for lr in 0.01 0.03; do
    cmp4 --methods disco --aggregators fedadam --set federation.server_lr=$lr --set federation.projector_rate_scale=0.1 \
      --seeds "${OPT_SEEDS:-0}" --out runs/v4/bench-optimizers-lr$lr-proj0.1
  done
  cmp4 --methods disco --aggregators fedadam --set federation.server_lr=0.003 --set federation.adaptivity=1e-5 \
    --set federation.projector_rate_scale=0.1 --seeds "${OPT_SEEDS:-0}" --out runs/v4/bench-optimizers-tau1e-5-lr0.003-proj0.1
fi
if [[ $part == all || $part == v4-optimizers-proj ]]; then # FedYogi and FedAdagrad with the projector's server step at 0.1x (FedAdam's best setting); seed 0
  cmp4 --methods disco --aggregators fedyogi --set federation.server_lr=0.01 --set federation.projector_rate_scale=0.1 \
    --seeds "${OPT_SEEDS:-0}" --out runs/v4/bench-optimizers-lr0.01-proj0.1-fedyogi
  cmp4 --methods disco --aggregators fedadagrad --set federation.server_lr=0.1 --set federation.projector_rate_scale=0.1 \
    --seeds "${OPT_SEEDS:-0}" --out runs/v4/bench-optimizers-lr0.1-proj0.1-fedadagrad
fi
if [[ $part == all || $part == v4-optimizers-beta0.5 ]]; then # every server optimizer at momentum 0.5 (the adaptive ones with the projector's server step at 0.1x): FedAvg at every seed on the same machine, a rate grid at seed 0, then each one's best rate at every seed
  BEST=${BEST:-fedadam:0.01 fedyogi:0.01 fedadagrad:0.03}  # the grid's best at seed 0
  for spec in ${GRID:-fedadam:0.003 fedadam:0.01 fedadam:0.03 fedyogi:0.003 fedyogi:0.01 fedyogi:0.03 fedadagrad:0.01 fedadagrad:0.03 fedadagrad:0.1} $BEST; do
    agg=${spec%%:*} lr=${spec##*:}
    seeds=0; [[ " $BEST " == *" $spec "* ]] && seeds=$SEEDS
    cmp4 --methods disco --aggregators "$agg" --set federation.server_lr="$lr" --set federation.beta1=0.5 \
      --set federation.projector_rate_scale=0.1 --seeds "$seeds" --out "runs/v4/bench-optimizers-lr$lr-proj0.1-beta0.5-$agg"
  done
  cmp4 --methods disco --aggregators fedavg --seeds "$SEEDS" --out runs/v4/bench-optimizers
  for lr in 0.25 0.5 1.0 2.0; do  # FedAvgM at every seed: 0.5 (its steady step is FedAvg's) and 1.0 (the best at seed 0)
    seeds=0; [[ $lr == 0.5 || $lr == 1.0 ]] && seeds=$SEEDS
    cmp4 --methods disco --aggregators fedavgm --set federation.server_lr=$lr --set federation.beta1=0.5 \
      --seeds "$seeds" --out runs/v4/bench-optimizers-avgm-beta0.5-lr$lr
  done
fi
if [[ $part == all || $part == v4-optimizers-bc ]]; then # every server optimizer at the papers' momentum 0.9 with bias correction (the adaptive ones with the projector's server step at 0.1x): a rate grid at seed 0, then each one's best rate at every seed; FedAvg as in optimizers-beta0.5
  BEST=${BEST:-}  # the grid's best at seed 0, e.g. "fedavgm:0.1 fedadam:0.03"
  for spec in ${GRID:-fedavgm:0.1 fedavgm:0.2 fedadam:0.01 fedadam:0.03 fedyogi:0.01 fedyogi:0.03 fedadagrad:0.01 fedadagrad:0.03} $BEST; do
    agg=${spec%%:*} lr=${spec##*:}
    seeds=0; [[ " $BEST " == *" $spec "* ]] && seeds=$SEEDS
    scale=0.1; [[ $agg == fedavgm ]] && scale=1
    cmp4 --methods disco --aggregators "$agg" --set federation.server_lr="$lr" --set federation.bias_correction=true \
      --set federation.projector_rate_scale=$scale --seeds "$seeds" --out "runs/v4/bench-optimizers-bc-lr$lr-$agg"
  done
  cmp4 --methods disco --aggregators fedavg --seeds "$SEEDS" --out runs/v4/bench-optimizers
  # the same at one local epoch, where a client's upload is a partial step (seed 0)
  ep1() { cmp4 --methods disco --seeds 0 --set train.local_epochs=1 "$@"; }
  ep1 --aggregators fedavg --out runs/v4/bench-ep1-fedavg
  ep1 --aggregators fedavgm --set federation.server_lr=0.1 --set federation.bias_correction=true --out runs/v4/bench-ep1-bc-lr0.1-fedavgm
  ep1 --aggregators fedavgm --set federation.server_lr=1.0 --out runs/v4/bench-ep1-lr1.0-fedavgm
  ep1 --aggregators fedadagrad --set federation.server_lr=0.03 --set federation.bias_correction=true \
    --set federation.projector_rate_scale=0.1 --out runs/v4/bench-ep1-bc-lr0.03-fedadagrad
fi
if [[ $part == all || $part == v4-regime-levers ]]; then # issue 16: training choices against the ratio bars, one at a time at seed 0, then the frozen projector with 4x the local steps at every seed
  cmp4 --methods finetune,disco --seeds 0 --set train.lr=0.005 --out runs/v4/bench-regime-lr0.005
  cmp4 --methods disco --seeds 0 --set train.batch_size=4 --out runs/v4/bench-regime-bs4
  cmp4 --methods finetune,disco,mtl --seeds 0 --set model.train_projector=false --out runs/v4/bench-regime-noproj
  cmp4 --methods zeroshot,finetune,ewc,lwf,olora,mlora,moelora,disco,mtl,mtl-fed --seeds "$SEEDS" \
    --set model.train_projector=false --set train.batch_size=4 --out runs/v4/bench-regime-noproj-bs4
  .venv/bin/python scripts/regime.py runs/v4/bench-regime-noproj-bs4 --markdown --per-dataset --interference
  # the seesaw: a smaller update (rate) or a larger one (a rank-32 LoRA on every linear layer of the language model)
  cmp4 --methods finetune,mtl,disco --seeds 0 --set train.lr=0.0005 --out runs/v4/bench-regime-lr0.0005
  cmp4 --methods finetune,mtl,disco --seeds 0 --set train.lr=0.001 --out runs/v4/bench-regime-lr0.001
  cmp4 --methods finetune,mtl,disco --seeds 0 --set train.lr=0.001 --set model.train_projector=false \
    --set train.batch_size=4 --out runs/v4/bench-regime-noproj-bs4-lr0.001
  cmp4 --methods finetune,mtl,disco --seeds 0 --set model.lora.r=32 --set model.lora.alpha=64 \
    --set 'model.lora.target=model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)' \
    --out runs/v4/bench-regime-r32-all
  for spec in fedadam,fedyogi:0.01 fedadagrad:0.03 fedavgm:1.0; do  # the server optimizers at momentum 0.5, seed 0
    cmp4 --methods disco --aggregators "${spec%%:*}" --set federation.server_lr="${spec##*:}" --set federation.beta1=0.5 \
      --set model.train_projector=false --set train.batch_size=4 --seeds 0 --out "runs/v4/bench-regime-noproj-bs4-opt-lr${spec##*:}"
  done
fi
if [[ $part == all || $part == combo ]]; then # issue 16: the three opt-in levers together (FCIT-Synth v5, the replay base, the projector frozen with batch 4): the ten methods at every seed, then DISCO under the server optimizers at momentum 0.5, a rate grid at seed 0 and each one's best (COMBO_BEST) at every seed
  replay_base
  COMBO=(--set model.path=runs/base-replay "${LEVERS[@]}")
  cmp --methods zeroshot,finetune,ewc,lwf,olora,mlora,moelora,disco,mtl,mtl-fed --seeds "$SEEDS" "${COMBO[@]}" \
    --out runs/combo-v5-replay
  .venv/bin/python scripts/regime.py runs/combo-v5-replay --markdown --per-dataset > runs/combo-v5-replay/regime.md
  # COMBO_GRID at seed 0, then COMBO_BEST (the grid's best, measured 2026-12-07) at every seed
  COMBO_BEST=${COMBO_BEST:-fedavgm:1.0 fedadagrad:0.03 fedadam:0.003 fedyogi:0.003}
  for spec in ${COMBO_GRID:-fedavgm:1.0 fedadagrad:0.03 fedadam:0.003 fedadam:0.01 fedadam:0.03 fedyogi:0.003 fedyogi:0.01 fedyogi:0.03} $COMBO_BEST; do
    agg=${spec%%:*} lr=${spec##*:}
    seeds=0; [[ " $COMBO_BEST " == *" $spec "* ]] && seeds=$SEEDS
    cmp --methods disco --aggregators "$agg" --set federation.server_lr="$lr" --set federation.beta1=0.5 "${COMBO[@]}" \
      --seeds "$seeds" --out "runs/combo-v5-replay-opt-$agg-lr$lr"
  done
  for spec in ${COMBO_GRID09:-fedavgm:0.5 fedadam:0.01 fedyogi:0.01 fedadagrad:0.001}; do  # the papers' momentum 0.9 (the default), seed 0, each at its best rate on the v4 grid
    cmp --methods disco --aggregators "${spec%%:*}" --set federation.server_lr="${spec##*:}" "${COMBO[@]}" --seeds 0 \
      --out "runs/combo-v5-replay-opt09-${spec%%:*}-lr${spec##*:}"
  done
fi
if [[ $part == all || $part == combo-bs16 ]]; then # issue 16: the levers that cost no speed (FCIT-Synth v5, the replay base, the projector frozen) at the default batch 16: the ten methods at every seed
  replay_base
  cmp --methods zeroshot,finetune,ewc,lwf,olora,mlora,moelora,disco,mtl,mtl-fed --seeds "$SEEDS" \
    --set model.path=runs/base-replay "${FREE_LEVERS[@]}" --out runs/combo-bs16
  .venv/bin/python scripts/regime.py runs/combo-bs16 --markdown --per-dataset > runs/combo-bs16/regime.md
  cmp --methods disco,mtl,finetune --seeds "$SEEDS" --set model.path=runs/base-replay "${FREE_LEVERS[@]}" \
    --set train.batch_size=8 --out runs/combo-bs8  # batch 8 costs no time either
  .venv/bin/python scripts/regime.py runs/combo-bs8 --markdown --per-dataset > runs/combo-bs8/regime.md
fi
if [[ $part == all || $part == sizes ]]; then # issue 16: the three levers' settings at seed 0 with fewer local epochs, then on a language model twice as wide (seed 0) and one twice as deep (every seed; each base about an hour at two threads)
  replay_base
  for ep in 1 2; do
    cmp --methods finetune,mtl,disco --seeds 0 --set model.path=runs/base-replay "${LEVERS[@]}" \
      --set train.local_epochs=$ep --out runs/combo-ep$ep
  done
  base base-wide --lm-hidden 384 --epochs 3 --instruct-epochs 2 --instruct-descriptions 10000 --replay-epochs 0
  base base-deep --lm-layers 8 --epochs 4 --instruct-epochs 3 --instruct-descriptions 10000 --replay-epochs 0
  for size in wide deep; do
    seeds=0; [[ $size == deep ]] && seeds=$SEEDS
    cmp --methods finetune,mtl,zeroshot,disco --seeds "$seeds" --set model.path=runs/base-$size "${LEVERS[@]}" \
      --out runs/$size-combo
    .venv/bin/python scripts/regime.py runs/$size-combo --markdown --per-dataset > runs/$size-combo/regime.md
  done
fi
if [[ $part == all || $part == v4-regime-v5 ]]; then # issue 16: the regime bars on FCIT-Synth v5 (the identity tokens' overlap), three seeds; then Finetune and DISCO in Het, seed 0
  cmp4 --methods zeroshot,finetune,ewc,lwf,olora,mlora,moelora,disco,mtl,mtl-fed --seeds "${V5_SEEDS:-$SEEDS}" \
    --set data.synth.version=5 --out runs/v4/bench-v5-hom
  .venv/bin/python scripts/regime.py runs/v4/bench-v5-hom --markdown --per-dataset --interference
  cmp4 --methods finetune,disco --seeds 0 --set data.synth.version=5 --set scenario.mode=het --out runs/v4/bench-v5-het
fi
if [[ $part == all || $part == ablation ]]; then   # DISCO identity ablation (activation: see the disco part)
  for id in image text+image; do
    cmp --methods disco --seeds "${ABL_SEEDS:-$SEEDS}" --set method.params.identity=$id --out runs/bench-ablation-id-$id
  done
fi
if [[ $part == all || $part == budget ]]; then    # the per-stage budget: 20 rounds per stage instead of 10, seed 0
  cmp --methods finetune,disco --seeds "${BUDGET_SEEDS:-0}" --set scenario.rounds=20 --out runs/bench-budget-rounds20
fi
if [[ $part == all || $part == ssa ]]; then
  .venv/bin/python scripts/bench_ssa.py
fi
if [[ $part == all || $part == flower ]]; then     # Flower engines vs in-process on the smoke setting
  .venv/bin/python scripts/bench_flower.py --deployment
fi
