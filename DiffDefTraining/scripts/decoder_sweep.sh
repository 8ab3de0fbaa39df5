#!/usr/bin/env bash
# Try a decoder setting against the shipped one without touching the evaluation grid:
#   DiffDefTraining/scripts/decoder_sweep.sh NAME KEY=VALUE [KEY=VALUE ...]
#   DiffDefTraining/scripts/decoder_sweep.sh mp3 decoder.mp_weight=3 device=cuda amp=false
# trains only the deformation decoder of $CONFIG (default shipped.yaml) with the overrides, on the upstream
# stages of $UPSTREAM (default runs/shipped; they must be current for the config), into $SWEEP_DIR/NAME
# (default runs/sweep), then
# scores its bundle against the synthetic law's truth on validation conditions ($VALIDATION, AGE:VOLUME pairs
# inside the training range that the evaluation grid does not use; seeds 0,1): $SWEEP_DIR/NAME/val/evaluation.md.
# With no override it reproduces the config's own decoder (the control: compare within one machine).
# A decoder takes about 33 min on a 2-core CPU and about 1 min on one H200 GPU (fp32); the scoring about 2 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:?usage: decoder_sweep.sh NAME [KEY=VALUE ...]}; shift
config=${CONFIG:-DiffDefTraining/configs/shipped.yaml}
upstream=${UPSTREAM:-runs/shipped}
validation=${VALIDATION:-55:20,65:26,75:33,72:20,62:38}
run=${SWEEP_DIR:-runs/sweep}/$name
sets=(--set "output=$run")
for kv in "$@"; do sets+=(--set "$kv"); done
mkdir -p "$run"
for s in autoencoder diffusion registration; do
  [ -e "$run/$s" ] || cp -r "$upstream/$s" "$run/$s"
done
diffdef-train pipeline --config "$config" "${sets[@]}" --stages decoder --no-progress
python -m diffdef_training.evaluate --model "$run/bundle" --methods DiffDef --conditions "$validation" --seeds 0,1 \
  --out "$run/val" --no-figures --no-progress
