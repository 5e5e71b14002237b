#!/usr/bin/env bash
# GPU readiness check: run on a machine with one NVIDIA GPU, from the repository root, in a few minutes.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]        # default output: $OUT, else runs/gpu_check
#   ACCELERATOR=cpu bash benchmarks/gpu_check.sh     # dry run of the same steps on CPU
#
# Self-contained: nothing is downloaded; the demo corpus is written on the machine. Python packages
# missing there can be brought as wheels in .whl/ (installed into /tmp/site first). Steps:
#   1. evaluation on the GPU: a short quickstart fit on the GPU, then recipes/eval_flickr30k.yaml
#      (`validate`) and recipes/eval_imagenet.yaml (`test`) from its checkpoint on the GPU, each also
#      on the CPU: the metrics must agree (the callbacks' encode -> gather -> chunked metrics on device);
#   2. benchmarks/retrieval_gallery.py: retrieval metrics at 10K x 50K and 100K x 500K on the GPU
#      versus CLIP_benchmark.
# Prints one table per step; record the output in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
accelerator=${ACCELERATOR:-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$accelerator" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

# -- 1. evaluation callbacks and recipes on the device ------------------------------------------------------
quiet=(--trainer.enable_progress_bar=false --trainer.enable_model_summary=false)
python3 -m align_lightning fit --config recipes/quickstart.yaml "${quiet[@]}" \
  --trainer.accelerator "$accelerator" --trainer.max_epochs 2 \
  --data.init_args.num_train 2048 --data.init_args.num_val 256 --data.init_args.num_workers 4 \
  --data.init_args.root "$out/demo" --trainer.logger.init_args.save_dir "$out" >"$out/fit.log" 2>&1
ckpt=$(ls "$out"/quickstart/version_*/checkpoints/*.ckpt | tail -n 1)
corpus=$(ls -d "$out"/demo/*/corpus)
for device in "$accelerator" cpu; do
  python3 -m align_lightning validate --config recipes/eval_flickr30k.yaml --ckpt_path "$ckpt" "${quiet[@]}" \
    --trainer.accelerator "$device" --trainer.logger.init_args.save_dir "$out/$device" \
    --data.init_args.annotations "$corpus/eval/dataset_demo.json" --data.init_args.image_root "$corpus/eval" \
    --data.init_args.image_size 64 >"$out/eval_flickr30k_$device.log" 2>&1
  python3 -m align_lightning test --config recipes/eval_imagenet.yaml --ckpt_path "$ckpt" "${quiet[@]}" \
    --trainer.accelerator "$device" --trainer.logger.init_args.save_dir "$out/$device" \
    --data.init_args.root "$corpus/zeroshot/val" --data.init_args.classnames "$corpus/zeroshot/classnames.txt" \
    --data.init_args.templates "$corpus/zeroshot/templates.txt" --data.init_args.image_size 64 \
    >"$out/eval_imagenet_$device.log" 2>&1
done
python3 - "$out" "$accelerator" <<'EOF'
import glob, json, sys
out, accelerator = sys.argv[1], sys.argv[2]
def metrics(device):
    merged = {}
    for path in sorted(glob.glob(f"{out}/{device}/eval_*/version_*/metrics.json")):
        merged.update(json.load(open(path)))
    return merged
on_device, on_cpu = metrics(accelerator), metrics("cpu")
print(f"\n| evaluation metric (quickstart checkpoint, demo sets) | {accelerator} | cpu | equal |")
print("|---|---|---|---|")
worst = 0.0
for key in sorted(on_device):
    diff = abs(on_device[key] - on_cpu[key])
    worst = max(worst, diff)
    print(f"| {key} | {on_device[key]:.4f} | {on_cpu[key]:.4f} | {'yes' if diff < 1e-6 else f'diff {diff:.2e}'} |")
if not on_device or set(on_device) != set(on_cpu):
    sys.exit("evaluation metrics missing")
print(f"\nlargest difference {accelerator} vs cpu: {worst:.2e} (ranks of near-ties may differ in float32)")
EOF

# -- 2. retrieval metrics at gallery scale ---------------------------------------------------------------------
if [ "$accelerator" = gpu ]; then
  python3 benchmarks/retrieval_gallery.py --device cuda --images 10000 100000 --no-record
else
  python3 benchmarks/retrieval_gallery.py --device cpu --images 1000 --no-record
fi
