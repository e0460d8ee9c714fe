#!/usr/bin/env bash
# Study C (issue 24): CIFAR-100-LT λ = 100 on the paper's protocol, in the order the issue asks for.
# Run it from a checkout pinned at one commit (the study's cells must come from one version of the
# code), with the CIFAR-100 copy unpacked at DATA (README, Data). Every step resumes when rerun:
# a finished experiment is re-collated, an interrupted one continues from its checkpoints.
#   git worktree add ../study <commit> && cd ../study && DATA=../data bash ablations/study_c.sh
set -u
DATA=${DATA:-data}
LOG=${LOG:-study-logs}
mkdir -p "$LOG"
run() { name=$1; shift; echo "$(date +%T) start $name" >> "$LOG/driver.log"
  python ablations/run.py --data-root "$DATA" --name "$name" "$@" >> "$LOG/$name.log" 2>&1
  rc=$?; echo "$(date +%T) end $name rc=$rc" >> "$LOG/driver.log"; }  # rc first: $(date) resets $?
# seed 0, every arm (RISDA's settings: batch 100, weight decay 5e-4, Nesterov; one shared CE stage I)
run study-c --spec cifar100lt_paper --arms ce,ce_drw,risda,no_reasoning,cov_only,no_reweight,ce_posthoc_la --seeds 0
run study-c-prototype --spec cifar100lt_paper --arms risda --grid graph_source=prototype --seeds 0
# the external check: CE and LDAM-DRW under LDAM-DRW's own settings (batch 128, weight decay 2e-4), each
# with its own stage I, as two experiments (so that the first could be read before the second ran)
run study-c-ldam-ce --spec cifar100lt_ldam --arms ce --seeds 0
run study-c-ldam-drw --spec cifar100lt_ldam --arms ldam_drw --seeds 0
# the baselines with their own stage I, under RISDA's settings
run study-c-baselines --spec cifar100lt_paper --arms ldam_drw,la_loss --seeds 0
# the authors' released code: their subset (seed 42), reflect padding, no warm-up (its own stage I)
run study-c-reference --spec cifar100lt_paper --arms risda --grid variant=reference --subset-seed 42 \
    --pad-mode reflect --warmup-epochs 0 --seeds 0
# seeds 1-2 of the core arms
run study-c-s12 --spec cifar100lt_paper --arms ce,ce_drw,risda,no_reasoning,cov_only,ce_posthoc_la --seeds 1,2
run study-c-prototype-s12 --spec cifar100lt_paper --arms risda --grid graph_source=prototype --seeds 1,2
# Table 5 across λ on seed 0 (each λ its own shared stage I; α, β from Table 2 per λ), as two experiments
# of two λ each: an experiment trains all its stage Is before any fork, so the first pair's cells finish
# (and can be committed) while the second pair's stage Is are still ahead
run study-c-lambda-a --spec cifar100lt_paper --arms ce,no_reweight,no_reasoning,risda --imbalance 200,50 --seeds 0
run study-c-lambda-b --spec cifar100lt_paper --arms ce,no_reweight,no_reasoning,risda --imbalance 20,10 --seeds 0
# the baselines' seeds 1-2
run study-c-baselines-s12 --spec cifar100lt_paper --arms ldam_drw,la_loss --seeds 1,2
# one table per study over seeds 0-2, and Table 5 over λ (no training; results/<name>/ for results/report.toml)
for m in "study-c,study-c-s12 study-c-all" "study-c-prototype,study-c-prototype-s12 study-c-prototype-all" \
         "study-c-baselines,study-c-baselines-s12 study-c-baselines-all" "study-c-lambda-a,study-c-lambda-b study-c-lambda"; do
  set -- $m; python ablations/run.py --collate-only --merge "$1" --name "$2" >> "$LOG/$2.log" 2>&1
  rc=$?; echo "$(date +%T) collated $2 rc=$rc" >> "$LOG/driver.log"
done
