#!/usr/bin/env bash
# Regenerates results/ (issue 13, item 4): every algorithm on Rotten Tomatoes 2-way and 3-way at
# s in {0.3, 0.5, 0.9}, 3 seeds, plus PF2LoRA's ablations, each sweep through pf2lora-sweep (real
# `flwr run` jobs, resumable: re-running skips finished jobs), then copies each sweep's report.md,
# report.csv and plots/ under results/.
#
#   scripts/regenerate_results.sh            # everything (see the job counts below)
#   STAGES="rt2 ablations" scripts/regenerate_results.sh
#
# Jobs: rt2 81 (9 algorithms x 3 s x 3 seeds), rt3 81, ablations 15 (5 variants x 3 seeds).
# Cost on 2 CPU cores: ~60-70 s of Flower start-up per job plus its compute (offline_quick:
# about 1-2 min per job), i.e. roughly 5-6 h for all 177 jobs: over issue 13's ~2 h budget.
# Not run in full yet (see results/README.md once it exists). Algorithms run at the defaults of
# conf/algorithm/ (PF2LoRA's are chosen on validation splits, see conf/algorithm/pf2lora.yaml);
# tuned configurations from `pf2lora-tune` (issue 12) go in EXTRA_<ALGORITHM> once it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/results}
STAGES=${STAGES:-rt2 rt3 ablations}
ALGORITHMS=pf2lora,homlora,hetlora,fedsa_lora,feddpa,perfedavg,ffa_lora,local,centralized
SEEDS=0,1,2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

rt3_csv=$("$PY" -c "from pathlib import Path; from benchmarks.robustness import rt3_csv; print(rt3_csv(Path.home() / '.cache' / 'pf2lora'))")
RT3=(task=files "+task.data_files.train=$rt3_csv" "task.text_columns=[text]" task.label_column=label
     task.name=rotten_tomatoes_3way task.max_length=64)

sweep() {  # name, overrides...
  local name=$1; shift
  "$PY" -m pf2lora_core.sweep -m experiment=offline_quick "name=$name" "output_dir=$OUT" \
    sweep.report_x=partition.s "$@"
}

start=$(date +%s)
for stage in $STAGES; do
  case $stage in
    rt2) sweep results_rt2 "algorithm=$ALGORITHMS" partition.s=0.3,0.5,0.9 "seed=$SEEDS" ;;
    rt3) sweep results_rt3 "${RT3[@]}" "algorithm=$ALGORITHMS" partition.s=0.3,0.5,0.9 "seed=$SEEDS" ;;
    ablations)  # the paper's: bilevel vs joint, first-order hypergradient, private rank r~
      sweep results_ablation_mode algorithm=pf2lora algorithm.mode=bilevel,joint partition.s=0.5 "seed=$SEEDS"
      sweep results_ablation_hvp algorithm=pf2lora algorithm.hvp=first_order partition.s=0.5 "seed=$SEEDS"
      for r in 1 2 4; do
        sweep "results_ablation_rank$r" algorithm=pf2lora "algorithm.private_rank=$r" \
          "algorithm.private_alpha=$((2 * r))" partition.s=0.5 "seed=$SEEDS"
      done ;;
    *) echo "unknown stage $stage (rt2, rt3, ablations)" >&2; exit 2 ;;
  esac
done
mkdir -p results
for dir in "$OUT"/sweeps/results_*; do
  [ -f "$dir/report.md" ] || continue
  dest=results/$(basename "$dir")
  mkdir -p "$dest"
  cp "$dir/report.md" "$dir/report.csv" "$dest/"
  [ -d "$dir/plots" ] && cp -r "$dir/plots" "$dest/"
done
echo "results/ regenerated from $OUT in $(( $(date +%s) - start )) s"
