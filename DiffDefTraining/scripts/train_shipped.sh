#!/usr/bin/env bash
# Retrain the shipped default model from scratch, its MP-loss ablation, and install the bundle into
# DiffDefSlicer/Resources/Models/default (on a 2-core CPU: about 1 h 45 min for the model, plus 45 min for the
# ablation, more on a slow day; docs/shipped-model.md gives the per-stage times). Safe to re-run: finished stages
# are skipped, and RESUME=1 continues interrupted stages from their checkpoints (without it, a stage with a
# checkpoint to continue is refused, not restarted).
set -euo pipefail
cd "$(dirname "$0")/../.."
resume=${RESUME:+--resume}
diffdef-train pipeline --config DiffDefTraining/configs/shipped.yaml --no-progress $resume
# the ablation shares the autoencoder, diffusion and registration stages; only the decoder is retrained
mkdir -p runs/shipped-no-mp
for s in autoencoder diffusion registration; do
  [ -e runs/shipped-no-mp/$s ] || cp -r runs/shipped/$s runs/shipped-no-mp/$s
done
diffdef-train pipeline --config DiffDefTraining/configs/shipped-no-mp.yaml --no-progress $resume
rm -rf DiffDefSlicer/Resources/Models/default.new
cp -r runs/shipped/bundle DiffDefSlicer/Resources/Models/default.new
rm -rf DiffDefSlicer/Resources/Models/default
mv DiffDefSlicer/Resources/Models/default.new DiffDefSlicer/Resources/Models/default
