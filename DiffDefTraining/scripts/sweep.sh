#!/usr/bin/env bash
# Try a training setting against the shipped one without touching the evaluation grid:
#   DiffDefTraining/scripts/sweep.sh NAME KEY=VALUE [KEY=VALUE ...]
#   DiffDefTraining/scripts/sweep.sh mp3 decoder.mp_weight=3 device=cuda amp=false
#   STAGES=registration,decoder DiffDefTraining/scripts/sweep.sh reg1600 registration.steps=1600
# retrains the stages $STAGES (default: decoder; the decoder is always among them, as it depends on every
# stage before it) of $CONFIG (default shipped.yaml) with the overrides, on the other stages of $UPSTREAM
# (a run folder, or a bundle, whose networks `diffdef-train unpack` turns into finished stages; default the
# shipped bundle DiffDefSlicer/Resources/Models/default; they must be current for the config), into
# $SWEEP_DIR/NAME (default runs/sweep), then scores its bundle against the synthetic law's truth on validation
# conditions ($VALIDATION, AGE:VOLUME pairs inside the training range that the evaluation grid does not use;
# seeds 0,1): $SWEEP_DIR/NAME/val/evaluation.md.
# With no override it reproduces the config's own stages (the control: compare within one machine).
# A decoder takes about 33 min on a 2-core CPU and about 1 min on one H200 GPU (fp32); the registration network
# about 1 s per step on the CPU; the scoring about 2 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:?usage: sweep.sh NAME [KEY=VALUE ...]}; shift
config=${CONFIG:-DiffDefTraining/configs/shipped.yaml}
upstream=${UPSTREAM:-DiffDefSlicer/Resources/Models/default}
stages=${STAGES:-decoder}
validation=${VALIDATION:-55:20,65:26,75:33,72:20,62:38}
case ",$stages," in
  *,decoder,*) ;;
  *) echo "STAGES must include decoder (got '$stages'): the scored bundle is made by the decoder stage." >&2; exit 2 ;;
esac
run=${SWEEP_DIR:-runs/sweep}/$name
sets=(--set "output=$run")
for kv in "$@"; do sets+=(--set "$kv"); done
mkdir -p "$run"
missing=()
for s in autoencoder diffusion registration; do
  case ",$stages," in *,"$s",*) continue ;; esac
  [ -e "$run/$s" ] || missing+=("$s")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -e "$upstream/model.json" ]; then  # a bundle: its networks become the run's finished stages
    (IFS=,; diffdef-train unpack "$upstream" --config "$config" "${sets[@]}" --stages "${missing[*]}")
  else
    for s in "${missing[@]}"; do cp -r "$upstream/$s" "$run/$s"; done
  fi
fi
diffdef-train pipeline --config "$config" "${sets[@]}" --stages "$stages" --no-progress
python -m diffdef_training.evaluate --model "$run/bundle" --methods DiffDef --conditions "$validation" --seeds 0,1 \
  --out "$run/val" --no-figures --no-progress
