#!/usr/bin/env bash
# The demo model v2's whole recipe in one command, into a directory of its own:
#
#     bash scripts/demo_v2_recipe.sh OUTDIR
#
# The same stages, configs and seeds as configs/demo/v2/README.md, each stage reading the previous
# stage's file from OUTDIR (never the committed ones under models/demo/v2), so the run checks that the
# recipe makes the demo model from nothing. The instruments read no earlier file and train on one
# thread beside the autoencoder (also one thread); the UNet stages then train on two. A stage whose
# file exists in OUTDIR is skipped, so a stopped run is resumed by running the command again (the
# interrupted stage starts again from its beginning). Every stage's log is OUTDIR/logs/STAGE.log, and
# OUTDIR/times.tsv gets a line per stage run: name, start and end (UTC), seconds.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash scripts/demo_v2_recipe.sh OUTDIR" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
V2=configs/demo/v2
cd "$(dirname "$0")/.."
mkdir -p "$OUT/logs" "$OUT/chain"
[[ -f "$OUT/times.tsv" ]] || printf 'stage\tstart\tend\tseconds\n' > "$OUT/times.tsv"

# stage NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists, logging and timing it.
stage() {
    local name=$1 output=$2
    shift 2
    if [[ -e "$output" ]]; then
        echo "$name: $output exists, skipped"
        return
    fi
    local start end
    start=$(date -u +%s)
    echo "$name: started $(date -u -d "@$start" +%H:%M:%S), log $OUT/logs/$name.log"
    "$@" > "$OUT/logs/$name.log" 2>&1
    end=$(date -u +%s)
    printf '%s\t%s\t%s\t%s\n' "$name" "$(date -u -d "@$start" +%FT%T)" "$(date -u -d "@$end" +%FT%T)" \
        "$((end - start))" >> "$OUT/times.tsv"
    echo "$name: finished in $((end - start)) s"
}

# Later configs override earlier ones: these point each stage at OUTDIR's files.
cat > "$OUT/chain/autoencoder-stage2.yaml" <<EOF
model:
  params:
    ckpt_path: $OUT/autoencoder-stage1.safetensors
EOF
unet_chain() {  # unet_chain STAGE [PREVIOUS]: the autoencoder (and the previous stage) from OUTDIR
    {
        echo "model:"
        echo "  params:"
        [[ $# -eq 2 ]] && echo "    ckpt_path: $OUT/$2.safetensors"
        echo "    first_stage_config:"
        echo "      params:"
        echo "        ckpt_path: $OUT/autoencoder.safetensors"
    } > "$OUT/chain/$1.yaml"
}

# 1 and 4. Autoencoder (two stages) on one thread, the instruments beside it on the other.
stage instruments "$OUT/instruments.json" \
    env PYTHONPATH=. python scripts/train_world_instruments.py --config $V2/instruments.yaml --out-dir "$OUT" &
instruments=$!
stage autoencoder-stage1 "$OUT/autoencoder-stage1.safetensors" \
    python scripts/train.py --config $V2/autoencoder.yaml --out "$OUT/autoencoder-stage1.safetensors" --threads 1
stage autoencoder-stage2 "$OUT/autoencoder.safetensors" \
    python scripts/train.py --config $V2/autoencoder.yaml $V2/autoencoder-stage2.yaml \
    "$OUT/chain/autoencoder-stage2.yaml" --out "$OUT/autoencoder.safetensors" --threads 1
wait "$instruments"

# 2. The latent scale factor of this autoencoder, used by every UNet stage.
stage scale-factor "$OUT/scale-factor.txt" \
    bash -c "set -o pipefail; python scripts/measure_scale_factor.py --autoencoder $V2/autoencoder.yaml \
        --weights '$OUT/autoencoder.safetensors' --data $V2/autoencoder.yaml --seed 99 --count 64 \
        | tee /dev/stderr | awk '/^scale_factor/ {print \$2}' > '$OUT/scale-factor.txt'"
printf 'model:\n  params:\n    scale_factor: %s\n' "$(cat "$OUT/scale-factor.txt")" > "$OUT/chain/scale-factor.yaml"
# The config to sample the finished model with: demo-inference.yaml with this scale factor.
python -c "import sys; from omegaconf import OmegaConf; OmegaConf.save(OmegaConf.merge(*map(OmegaConf.load, \
sys.argv[1:3])), sys.argv[3])" $V2/demo-inference.yaml "$OUT/chain/scale-factor.yaml" "$OUT/demo-inference.yaml"

# 3. UNet and text transformer, five stages; 3b's stages add the face-heavy data of stage 3.
unet_chain demo-stage1
unet_chain demo-stage2 demo-stage1
unet_chain demo-stage3 demo-stage2
unet_chain demo-stage4 demo-stage3
unet_chain demo-stage5 demo-stage4
unet() {  # unet STAGE CONFIG...: train one UNet stage on two threads
    local name=$1
    shift
    stage "$name" "$OUT/$name.safetensors" python scripts/train.py --config $V2/demo-inference.yaml "$@" \
        "$OUT/chain/scale-factor.yaml" "$OUT/chain/$name.yaml" --out "$OUT/$name.safetensors" --dtype float16 \
        --threads 2
}
unet demo-stage1 $V2/demo-train.yaml
unet demo-stage2 $V2/demo-train.yaml $V2/demo-train-stage2.yaml
unet demo-stage3 $V2/demo-train.yaml $V2/demo-train-stage3.yaml
unet demo-stage4 $V2/demo-train.yaml $V2/demo-train-stage3.yaml $V2/demo-train-stage4.yaml
unet demo-stage5 $V2/demo-train.yaml $V2/demo-train-stage3.yaml $V2/demo-train-stage5.yaml
echo "done: $OUT/demo-stage5.safetensors is the demo model; times in $OUT/times.tsv"
