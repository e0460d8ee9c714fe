#!/usr/bin/env bash
# Study B of the reproduction report (results/REPRODUCTION.md): the full CIFAR-10-LT λ=100 table on
# one lent GPU inside about 10 minutes. All 12,406 training images, the full test set, the paper's
# 200 epochs (stage I 160, lr x0.01 at 160 and 180), the arms ce, ce_drw, no_reasoning, cov_only,
# no_reweight, risda (paper) and risda (reference), head_count 2, α 0.5, β 0.75 (Table 2, λ=100).
#
# Stage I is shared: one `risda.train --stage1-only` per seed (with the reference observations),
# then every cell forks stage II from it, all cells of all seeds at once on the one GPU (several
# trials per GPU: the lent machine has no Ray, whose wheel is over the 64 MiB a call can carry, so
# plain processes). Each cell writes summary.json and epochs.parquet to $OUT/runs/<cell>/; the
# tables and the report are made back here from those files:
#
#   python bench/pack_cifar10lt.py                                   # once: data/cifar10lt_r100.npz (~21 MB)
#   device run: bash bench/gpu_study.sh   (carry ["data/cifar10lt_r100.npz"], timeout_s 600)
#   here:       python ablations/run.py --spec cifar10lt_full --from-runs <files_at>/runs --name study-b
#               python ablations/run.py --spec cifar10lt_full --from-runs <files_at>/runs --arms risda --grid variant=reference --name study-b-reference
#               python ablations/report.py --results results/study-b ...
#   CPU smoke test: TINY=1 bash bench/gpu_study.sh                   # a few minutes on 2 cores
#                   bash bench/gpu_study.sh --smoke                  # TINY, 2 epochs, 2 cells: the test suite runs it
#
# Knobs (env): SEEDS (model seeds, default "0"; the packed subset is seed 0's, so further seeds vary
# the model only), PRECISION (default auto: bf16 where it is faster), BUDGET_S (whole script, default
# 540), PYTHON, OUT, PACK.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TINY=${TINY:-0}
SMOKE=0; if [ "${1:-}" = --smoke ]; then TINY=1; SMOKE=1; fi
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/runs/gpu_study}
SEEDS=${SEEDS:-0}
PRECISION=${PRECISION:-auto}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_study.XXXXXX")
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT/runs"
LOG=$OUT/gpu_study.log
: >"$LOG"
log() { echo "[gpu_study $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG" >&2; }

if [ "$TINY" = 1 ]; then
  BUDGET_S=${BUDGET_S:-900}; EPOCHS=5; DEVICE=cpu; PACK=${PACK:-$WORK/tiny.npz}; IMB=10
  SIZE_FLAGS="--n-max 30 --lr 0.02 --warmup-epochs 0 --eval-every 1"; export OMP_NUM_THREADS=1
  [ "$SMOKE" = 1 ] && EPOCHS=2
else
  BUDGET_S=${BUDGET_S:-540}; EPOCHS=200; DEVICE=cuda; PACK=${PACK:-data/cifar10lt_r100.npz}; IMB=100
  SIZE_FLAGS="--warmup-epochs 5 --eval-every 5 --channels-last"
fi
left() { echo $((BUDGET_S - SECONDS)); }

# --- data: the packed subset, unpacked into torchvision's CIFAR-10 pickle folder ------------------
if [ "$TINY" = 1 ] && [ ! -f "$PACK" ]; then
  "$PY" bench/pack_cifar10lt.py --out "$PACK" --imbalance $IMB --n-max 30 --test-per-class 10 --val-max 0 \
    >>"$LOG" 2>&1 || { log "packing failed (is ../shared/data/cifar10-jpeg there?)"; exit 1; }
fi
[ -f "$PACK" ] || { log "no $PACK: run 'python bench/pack_cifar10lt.py' here first and carry it"; exit 1; }
DATA=$WORK/cifar10lt
"$PY" bench/pack_cifar10lt.py --unpack "$PACK" --to "$DATA" --check-val 0 >>"$LOG" 2>&1 || { log "unpack failed"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$LOG" 2>&1
# Stage-I flags given explicitly, so that the reference variant's run forks the same stage I.
COMMON="--dataset cifar10lt --data-root $DATA --imbalance $IMB --epochs $EPOCHS --head-count 2 --alpha 0.5 --beta 0.75
        --subset-seed 0 --pad-mode zeros --val-per-class 0 --device $DEVICE --precision $PRECISION --no-progress $SIZE_FLAGS"

# --- stage I, once per seed (all seeds at once) ------------------------------------------------------
t0=$SECONDS
for seed in $SEEDS; do
  timeout $(( $(left) - 30 )) "$PY" -m risda.train $COMMON --seed $seed --arm risda --variant reference --stage1-only \
      --out "$WORK/stage1-$seed" >"$WORK/stage1-$seed.log" 2>&1 &
done
wait
STAGE1_S=$((SECONDS - t0))
for seed in $SEEDS; do
  tail -1 "$WORK/stage1-$seed.log" | tee -a "$LOG" >&2
  [ -f "$WORK/stage1-$seed/checkpoint.pt" ] || { log "stage I of seed $seed did not finish"; cat "$WORK/stage1-$seed.log" >>"$LOG"; }
done
log "stage I: ${STAGE1_S}s for seeds [$SEEDS]"

# --- stage II: every cell of every seed forks its seed's stage I, all at once on the GPU -----------
CELLS="ce:paper ce_drw:paper no_reasoning:paper cov_only:paper no_reweight:paper risda:paper risda:reference"
[ "$SMOKE" = 1 ] && CELLS="ce:paper risda:reference"
t1=$SECONDS
n=0
for seed in $SEEDS; do
  [ -f "$WORK/stage1-$seed/checkpoint.pt" ] || continue
  for cell in $CELLS; do
    arm=${cell%%:*}; variant=${cell##*:}; name="$arm-$variant-seed$seed"
    timeout $(( $(left) - 20 )) "$PY" -m risda.train $COMMON --seed $seed --arm $arm --variant $variant \
        --stage1-from "$WORK/stage1-$seed/checkpoint.pt" --out "$OUT/runs/$name" >"$OUT/runs/$name.log" 2>&1 &
    n=$((n + 1))
  done
done
wait
STAGE2_S=$((SECONDS - t1))
ok=$(ls "$OUT"/runs/*/summary.json 2>/dev/null | wc -l)
log "stage II: $n cells at once, ${STAGE2_S}s; $ok finished"
"$PY" - "$OUT" "$STAGE1_S" "$STAGE2_S" "$n" "$EPOCHS" <<'EOF' | tee -a "$LOG" >&2
import glob, json, os, sys
out, stage1_s, stage2_s, cells, epochs = sys.argv[1], *map(int, sys.argv[2:])
runs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/runs/*/summary.json"))]
import torch
train = runs[0]["train_size"] if runs else 0
stage2_epochs = epochs - int(0.8 * epochs)
fig = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", cells=cells, finished=len(runs),
           stage1_wall_s=stage1_s, stage2_wall_s=stage2_s, trials_per_gpu=cells,
           stage2_images_per_s_all_trials=cells * stage2_epochs * train / max(stage2_s, 1),
           precision=sorted({r.get("precision") for r in runs}),
           epoch_s_stage2_per_trial=stage2_s / max(stage2_epochs, 1))
json.dump(fig, open(f"{out}/figures.json", "w"), indent=1)
print(json.dumps(fig))
EOF
rm -rf "$WORK"
[ "$ok" -eq "$n" ] && [ "$n" -gt 0 ]
