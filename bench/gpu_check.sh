#!/usr/bin/env bash
# GPU check for a lent machine (15 minutes of device time in all, 10 per command):
#   1. epoch time of ResNet-32 on CIFAR-10-LT λ=100 (12,406 images), fp32 and bf16+channels_last,
#      stage I (CE) and stage II (RISDA) epochs separately;
#   2. a full 200-epoch RISDA run, if the measured epoch times say it fits FULL_BUDGET_S
#      (default 300 s), always under `timeout`;
#   3. 4 concurrent 0.25-GPU trials through tune/search.py (Ray Tune). Where ray/optuna are not
#      importable (the lent image has neither, and ray's wheel, 79 MB, is over the 64 MiB a call
#      can carry), 4 concurrent plain `risda.train` processes on the one GPU stand in, labelled so.
# Figures go to $OUT/figures.json (+ gpu_check.log, full_summary.json, tune_trials.parquet).
#
# Prepare here, once:   python bench/pack_cifar10lt.py        # -> data/cifar10lt_r100.npz (~20 MiB)
# On the GPU machine:   bash bench/gpu_check.sh                # run(..., carry=["data/cifar10lt_r100.npz"], timeout_s=600)
#                       (carry ".whl" too if you bring wheels: WHEELS=.whl, installed with --no-index)
# CPU smoke test:       TINY=1 bash bench/gpu_check.sh         # ~2-4 min on 2 cores; packs a tiny subset itself
#                       bash bench/gpu_check.sh --smoke        # TINY cut to the bone: fp32 timing only, a 2-epoch
#                                                              # "full" run, 2 concurrent processes (no Ray); the test suite runs it
#
# Knobs (env): PACK, WHEELS, PYTHON, BUDGET_S (whole script, default 560), FULL_BUDGET_S, TUNE_BUDGET_S,
# TIME_EPOCHS, TUNE_EPOCHS, HEAD_COUNT (default 2: 20% of the classes, as 20 of 100 on CIFAR-100),
# CONCURRENT=processes (skip Ray even where it imports), KEEP_WORK=1 (keep the scratch folder).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TINY=${TINY:-0}
SMOKE=0; if [ "${1:-}" = --smoke ]; then TINY=1; SMOKE=1; CONCURRENT=${CONCURRENT:-processes}; fi
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/runs/gpu_check}
WHEELS=${WHEELS:-.whl}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT"
rm -f "$OUT"/{figures.json,gpu_check.log,full_summary.json,tune.log,tune_trials.parquet}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
: >"$LOG"
log() { echo "[gpu_check $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG" >&2; }
left() { echo $((BUDGET_S - SECONDS)); }  # seconds left of the whole script's budget

if [ "$TINY" = 1 ]; then
  BUDGET_S=${BUDGET_S:-600}; FULL_BUDGET_S=${FULL_BUDGET_S:-90}; TUNE_BUDGET_S=${TUNE_BUDGET_S:-150}
  TIME_EPOCHS=${TIME_EPOCHS:-4}; FULL_EPOCHS=4; TUNE_EPOCHS=${TUNE_EPOCHS:-1}; DEVICE=cpu; THREADS=1
  PACK=${PACK:-$WORK/tiny.npz}; NMAX_FLAG="--n-max 30 --lr 0.02"; IMB=10  # lr: see time_epochs
  [ "$SMOKE" = 1 ] && FULL_EPOCHS=2
else
  BUDGET_S=${BUDGET_S:-560}; FULL_BUDGET_S=${FULL_BUDGET_S:-300}; TUNE_BUDGET_S=${TUNE_BUDGET_S:-150}
  TIME_EPOCHS=${TIME_EPOCHS:-8}; FULL_EPOCHS=200; TUNE_EPOCHS=${TUNE_EPOCHS:-20}; DEVICE=auto; THREADS=2
  PACK=${PACK:-data/cifar10lt_r100.npz}; NMAX_FLAG=""; IMB=100
fi
HEAD_COUNT=${HEAD_COUNT:-2}
N_CONCURRENT=4; [ "$SMOKE" = 1 ] && N_CONCURRENT=2  # the processes of step 4 when Ray is not used
CONCURRENT=${CONCURRENT:-auto}  # auto: tune/search.py when ray+optuna import, else processes
echo "{}" >"$WORK/figures.json"
# fig KEY JSON: merge one figure into figures.json (and copy it to $OUT at once, in case we are killed)
fig() { "$PY" - "$WORK/figures.json" "$1" "$2" <<'EOF'
import json, sys
path, key, value = sys.argv[1:]
d = json.load(open(path)); d[key] = json.loads(value); json.dump(d, open(path, "w"), indent=1)
EOF
  cp "$WORK/figures.json" "$OUT/figures.json"; }

# --- 0. machine and packages ---------------------------------------------------------------
log "repo $REPO, work $WORK, out $OUT, tiny=$TINY, budget ${BUDGET_S}s"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG" >&2
fig machine "$("$PY" -c "
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, cuda=cuda,
      gpu=torch.cuda.get_device_name() if cuda else None, host=platform.node(), cpus=__import__('os').cpu_count())))")" \
  || { log "python/torch unusable"; exit 1; }

have() { "$PY" -c "import $1" 2>/dev/null; }
install_wheels() {  # every wheel under $WHEELS, no registry; into $WORK/site
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || return 1
  log "installing wheels from $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links "$WHEELS" \
    --target "$WORK/site" "$WHEELS"/*.whl 2>&1 | tail -3 | tee -a "$LOG" >&2
  export PYTHONPATH=$PYTHONPATH:$WORK/site
}
missing=""; for m in numpy torchvision rich pandas pyarrow; do have $m || missing="$missing $m"; done
if [ -n "$missing" ]; then install_wheels; for m in $missing; do have $m || { log "missing $m and no wheel for it in $WHEELS"; exit 1; }; done; fi
TUNE_READY=1; for m in ray optuna; do have $m || TUNE_READY=0; done
if [ $TUNE_READY = 0 ] && install_wheels; then TUNE_READY=1; for m in ray optuna; do have $m || TUNE_READY=0; done; fi

# --- 1. data: the packed CIFAR-10-LT subset, unpacked to torchvision's CIFAR pickle folder ---
if [ "$TINY" = 1 ] && [ ! -f "$PACK" ]; then
  "$PY" bench/pack_cifar10lt.py --out "$PACK" --imbalance $IMB --n-max 30 --test-per-class 10 --val-max 20 2>&1 | tee -a "$LOG" >&2 \
    || { log "packing failed (is ../shared/data/cifar10-jpeg there?)"; exit 1; }
fi
[ -f "$PACK" ] || { log "no $PACK: run 'python bench/pack_cifar10lt.py' here first and carry the file"; exit 1; }
DATA=$WORK/cifar10lt
"$PY" bench/pack_cifar10lt.py --unpack "$PACK" --to "$DATA" --check-val 0,20 2>&1 | tee -a "$LOG" >&2 || { log "unpack failed"; exit 1; }
DATA_FLAGS="--dataset cifar10lt --data-root $DATA --imbalance $IMB $NMAX_FLAG --device $DEVICE --head-count $HEAD_COUNT"
ARM=risda

# --- 2. epoch times ------------------------------------------------------------------------
# lr 0.02 (timing only): at 0.1 with no warm-up, a small subset leaves eval-mode features so large
# (~1e5 after a dozen steps) that stage II's covariance term overflows to NaN; lr does not change the time.
time_epochs() {  # NAME EXTRA_FLAGS...: E epochs (stage II from E/2), per-epoch wall times
  local name=$1; shift
  timeout $(( $(left) > 30 ? $(left) - 20 : 10 )) "$PY" - "$name" "$WORK/time-$name" $DATA_FLAGS --arm $ARM \
      --epochs $TIME_EPOCHS --stage1-epochs $((TIME_EPOCHS / 2)) --lr 0.02 --eval-every $TIME_EPOCHS \
      --checkpoint-every 1 --no-progress "$@" <<'EOF' >"$WORK/time-$name.json" 2> >(tee -a "$LOG" >&2)
import argparse, json, statistics, sys, time
import torch
from risda.trainer.config import Config, add_config_args, config_overrides
from risda.trainer.data import load_long_tail
from risda.trainer.loop import pick_device, train
name, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
p = argparse.ArgumentParser(); add_config_args(p)
cfg = Config(**config_overrides(p.parse_args(argv)), out=out).validate().resolved()  # a RunConfig, as every entry
t0 = time.time(); data = load_long_tail(cfg, pick_device(cfg.device)); load_s = time.time() - t0
walls = []
train(cfg, data=data, on_epoch=lambda rec, ckpt: walls.append(rec["wall_time_s"]))
dt = [b - a for a, b in zip([0.0] + walls, walls)]  # epoch 0 includes warm-up, the last the final evaluation
s1, e = cfg.stage1_epochs, cfg.epochs
med = lambda xs: statistics.median(xs) if xs else None
stage1, stage2 = med(dt[1:s1]), med(dt[s1 + 1:e - 1])
r = dict(name=name, precision=cfg.precision, channels_last=cfg.channels_last, arm=cfg.arm, train_images=len(data.train),
         batch_size=cfg.batch_size, data_load_s=load_s, epoch_s=dt, first_epoch_s=dt[0], stage1_epoch_s=stage1,
         stage2_epoch_s=stage2, stage2_first_epoch_s=dt[s1] if s1 < e else None,
         final_eval_s=max(0.0, dt[-1] - med(dt[1:-1])) if e > 2 else None, images_per_s_stage1=len(data.train) / stage1 if stage1 else None,
         device=str(torch.cuda.get_device_name()) if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
print(json.dumps(r))
EOF
}
for spec in "fp32:--precision fp32" "bf16_cl:--precision bf16 --channels-last"; do
  name=${spec%%:*}
  [ "$SMOKE" = 1 ] && [ "$name" != fp32 ] && continue
  log "timing $TIME_EPOCHS epochs ($name, arm $ARM)"
  if time_epochs $name ${spec#*:}; then
    fig "epoch_time_$name" "$(cat "$WORK/time-$name.json")"
    log "  $name: $(cut -c1-300 "$WORK/time-$name.json")"
  else log "  $name timing failed"; fi
done

# --- 3. full 200-epoch run, if it fits -----------------------------------------------------
best=$("$PY" - "$WORK" <<'EOF'
import json, sys, glob
rs = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/time-*.json") if open(f).read().strip()]
rs = [r for r in rs if r["stage1_epoch_s"]]
if rs:
    r = min(rs, key=lambda r: r["stage1_epoch_s"])
    print(r["name"], r["stage1_epoch_s"], r["stage2_epoch_s"] or r["stage1_epoch_s"], r["final_eval_s"])
EOF
)
if [ -n "$best" ]; then
  read -r bname s1 s2 ev <<<"$best"
  [ "$bname" = bf16_cl ] && PREC="--precision bf16 --channels-last" || PREC="--precision fp32"
  projected=$("$PY" -c "print(int(0.8*$FULL_EPOCHS*$s1 + 0.2*$FULL_EPOCHS*$s2 + ($FULL_EPOCHS//10)*max($ev,0) + 20))")
  budget=$(( FULL_BUDGET_S < $(left) - TUNE_BUDGET_S ? FULL_BUDGET_S : $(left) - TUNE_BUDGET_S ))
  log "full $FULL_EPOCHS-epoch $ARM run ($bname): projected ${projected}s, budget ${budget}s"
  if [ "$projected" -le "$budget" ]; then
    t0=$SECONDS
    timeout $((budget + 30)) "$PY" -m risda.train $DATA_FLAGS --arm $ARM --epochs $FULL_EPOCHS $PREC \
      --out "$WORK/full" --no-progress 2>&1 | tail -5 | tee -a "$LOG" >&2
    rc=${PIPESTATUS[0]}
    if [ -f "$WORK/full/summary.json" ]; then
      cp "$WORK/full/summary.json" "$OUT/full_summary.json"
      fig full_run "$("$PY" -c "
import json; s = json.load(open('$WORK/full/summary.json'))
print(json.dumps({k: s.get(k) for k in ('test_error', 'many_error', 'medium_error', 'few_error', 'best_test_error', 'wall_time_s', 'images_per_s', 'epochs_run', 'device')} | dict(precision='$bname', projected_s=$projected)))")"
    else fig full_run "{\"status\": \"rc $rc after $((SECONDS - t0))s (124 = timeout)\", \"projected_s\": $projected}"; fi
  else fig full_run "{\"status\": \"skipped: projected ${projected}s > budget ${budget}s\", \"projected_s\": $projected}"; fi
else log "no epoch timing: full run skipped"; fi

# --- 4. four concurrent 0.25-GPU trials ----------------------------------------------------
budget=$(( TUNE_BUDGET_S < $(left) - 10 ? TUNE_BUDGET_S : $(left) - 10 ))
if [ "$budget" -lt 30 ]; then fig concurrent "{\"status\": \"skipped: ${budget}s left\"}"
elif [ $TUNE_READY = 1 ] && [ "$CONCURRENT" != processes ]; then
  if [ "$DEVICE" = cpu ]; then RES="--gpus-per-trial 0 --cpus-per-trial 0.5"; else RES="--gpus-per-trial 0.25 --cpus-per-trial 2"; fi
  log "tune/search.py: 4 trials x $TUNE_EPOCHS epochs ($RES), budget ${budget}s"
  t0=$SECONDS
  timeout $budget "$PY" tune/search.py $DATA_FLAGS $RES --num-samples 4 --max-concurrent 4 --scheduler none \
    --epochs $TUNE_EPOCHS --eval-every $TUNE_EPOCHS --val-per-class 20 --name gpu_check --results "$WORK/results" \
    --storage "$WORK/ray_results" >"$WORK/tune.log" 2>&1
  rc=$?; wall=$((SECONDS - t0)); tail -20 "$WORK/tune.log" | tee -a "$LOG" >&2; cp "$WORK/tune.log" "$OUT/tune.log"
  trials=$WORK/results/gpu_check/trials.parquet
  if [ -f "$trials" ]; then
    cp "$trials" "$OUT/tune_trials.parquet"
    fig concurrent "$("$PY" -c "
import json, pandas as pd
t = pd.read_parquet('$trials'); cols = [c for c in t.columns if c in ('status', 'final_val_error', 'final_test_error', 'wall_time_s', 'time_total_s')]
print(json.dumps(dict(mode='tune/search.py (ray)', rc=$rc, wall_s=$wall, epochs=$TUNE_EPOCHS, trials=json.loads(t[cols].to_json(orient='records')))))")"
  else fig concurrent "{\"mode\": \"tune/search.py (ray)\", \"status\": \"rc $rc, no trials.parquet after ${wall}s; see tune.log\"}"; fi
else
  why="ray/optuna not importable"
  [ "$CONCURRENT" = processes ] && why="CONCURRENT=processes"
  log "$why: $N_CONCURRENT concurrent risda.train processes instead, $TUNE_EPOCHS epochs each, budget ${budget}s"
  t0=$SECONDS; pids=""
  for i in $(seq 0 $((N_CONCURRENT - 1))); do
    OMP_NUM_THREADS=$THREADS timeout $budget "$PY" -m risda.train $DATA_FLAGS --arm $ARM --epochs $TUNE_EPOCHS --seed $i \
      --val-per-class 20 --eval-every $TUNE_EPOCHS --out "$WORK/conc/$i" --no-progress >"$WORK/conc-$i.log" 2>&1 &
    pids="$pids $!"
  done
  rcs=""; for p in $pids; do wait $p; rcs="$rcs,$?"; done
  wall=$((SECONDS - t0))
  fig concurrent "$("$PY" - "$WORK" "$why" $wall $TUNE_EPOCHS "${rcs#,}" <<'EOF'
import glob, json, sys
work, why, wall, epochs, rcs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
runs = [json.load(open(f)) for f in sorted(glob.glob(work + "/conc/*/summary.json"))]
images = sum(r["train_size"] * r["epochs_run"] for r in runs)
print(json.dumps(dict(mode=f"{len(rcs.split(','))} concurrent risda.train processes ({why})", finished=len(runs), exit_codes=rcs, wall_s=wall, epochs=epochs,
                      aggregate_images_per_s=images / wall if wall else None,
                      per_run=[dict(wall_time_s=r["wall_time_s"], images_per_s=r["images_per_s"], test_error=r["test_error"]) for r in runs])))
EOF
)"
  tail -n 3 "$WORK"/conc-*.log | tee -a "$LOG" >&2
fi

log "done in ${SECONDS}s"
cat "$WORK/figures.json" | tee -a "$LOG"
cp "$WORK/figures.json" "$OUT/figures.json"
[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
