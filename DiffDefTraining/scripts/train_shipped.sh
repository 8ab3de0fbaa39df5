#!/usr/bin/env bash
# Retrain the shipped default model from scratch, its MP-loss ablation and the benchmark's conditional template
# network, and install the bundles into DiffDefSlicer/Resources/Models/default, DiffDefTraining/models/default-no-mp
# and DiffDefTraining/models/conditional-template (the benchmark's baselines, which read the networks they share
# with the default from there) (on a 2-core CPU: about 1 h 45 min for the model, plus 45 min for the ablation and
# 35 min for the conditional template, more on a slow day; docs/shipped-model.md gives the per-stage times). Safe to re-run: finished stages
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
rm -rf DiffDefTraining/models/default-no-mp.new
cp -r runs/shipped-no-mp/bundle DiffDefTraining/models/default-no-mp.new
diffdef-train share-weights DiffDefTraining/models/default-no-mp.new --base DiffDefSlicer/Resources/Models/default
rm -rf DiffDefTraining/models/default-no-mp
mv DiffDefTraining/models/default-no-mp.new DiffDefTraining/models/default-no-mp
# the conditional template network: trained on the installed default's cohort and networks, per subject
rm -rf DiffDefTraining/models/conditional-template.new
diffdef-train conditional-template DiffDefSlicer/Resources/Models/default --output \
  DiffDefTraining/models/conditional-template.new --run runs/conditional-template --no-progress $resume
rm -rf DiffDefTraining/models/conditional-template
mv DiffDefTraining/models/conditional-template.new DiffDefTraining/models/conditional-template
