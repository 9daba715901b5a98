#!/usr/bin/env bash
# Submit launch/slurm.sbatch from any directory.
#
#   launch/submit.sh [sbatch options] [-- megamix train arguments]
#   CONFIG=configs/gpt-1b.yaml launch/submit.sh --nodes 4 --time 12:00:00 -- --set train.steps=20000
#
# sbatch opens the job's --output file before the job starts, so a missing log directory makes the job fail
# without any log: this creates LOG_DIR first (default logs/, under the current directory), writes the log
# to LOG_DIR/<job name>-<job id>.out, and exports MEGAMIX_HOME (this checkout) to the job, whose script
# SLURM runs from a spool copy. Environment knobs (CONFIG, SETS, BACKEND, DRY_RUN, ...) reach the job as
# with plain sbatch (--export=ALL).
set -euo pipefail
MEGAMIX_HOME="${MEGAMIX_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export MEGAMIX_HOME
LOG_DIR="${LOG_DIR:-logs}"
SBATCH_ARGS=()
TRAIN_EXTRA=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then
    shift
    TRAIN_EXTRA=("$@")
    break
  fi
  SBATCH_ARGS+=("$1")
  shift
done
mkdir -p "$LOG_DIR"
exec sbatch --output "$LOG_DIR/%x-%j.out" "${SBATCH_ARGS[@]}" "$MEGAMIX_HOME/launch/slurm.sbatch" "${TRAIN_EXTRA[@]}"
