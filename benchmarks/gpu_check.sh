#!/usr/bin/env bash
# GPU readiness check: run on a machine with one NVIDIA GPU, from the repository root, in a few minutes.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]        # default output: $OUT, else runs/gpu_check
#   ACCELERATOR=cpu bash benchmarks/gpu_check.sh     # dry run of the same steps on CPU (tiny sizes)
#   SECTIONS="strategies quickstart" bash benchmarks/gpu_check.sh   # some steps only
#
# Self-contained: nothing is downloaded; the demo corpus is written on the machine. Python packages
# missing there can be brought as wheels in .whl/ (installed into /tmp/site first). Steps:
#   evaluation: a short quickstart fit on the GPU, then recipes/eval_flickr30k.yaml (`validate`) and
#      recipes/eval_imagenet.yaml (`test`) from its checkpoint on the GPU and on the CPU: the metrics
#      must agree (the callbacks' encode -> gather -> chunked metrics on device);
#   gallery: benchmarks/retrieval_gallery.py, retrieval metrics at 10K x 50K and 100K x 500K on the
#      GPU versus CLIP_benchmark;
#   strategies: benchmarks/strategies_gpu.py, ALIGN-base (EfficientNet-B7 + BERT-base, 289 px) under
#      DDP, FSDP2 and FSDP1 with bf16 for a few dozen steps: samples/s, peak memory, MFU, loss falls;
#   quickstart: the quickstart recipe (its evaluation callbacks included) under fsdp_align (FSDP1) and
#      fsdp2 on the GPU;
#   fsdp1: FSDP1 with a frozen image tower and a sharded checkpoint, then a run resumed from it;
#   gradcache: ALIGN-base with gradient caching (batch 256 in micro-batches of 64, as
#      recipes/align_base_1gpu.yaml) under DDP bf16, DDP 16-mixed (gradient scaler) and FSDP2: peak
#      memory of one micro-batch, samples/s versus the strategies table, loss falls.
# All sections by default. Prints one table per step; record the output in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
accelerator=${ACCELERATOR:-gpu}
sections=" ${SECTIONS:-evaluation gallery strategies quickstart fsdp1 gradcache} "
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
quiet=(--trainer.enable_progress_bar=false --trainer.enable_model_summary=false)

# -- evaluation callbacks and recipes on the device ---------------------------------------------------------
if [[ $sections == *" evaluation "* ]]; then
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
  python3 benchmarks/_compare_eval.py "$out" "$accelerator"
fi

# -- retrieval metrics at gallery scale ---------------------------------------------------------------------
if [[ $sections == *" gallery "* ]]; then
  if [ "$accelerator" = gpu ]; then
    python3 benchmarks/retrieval_gallery.py --device cuda --images 10000 100000 --no-record
  else
    python3 benchmarks/retrieval_gallery.py --device cpu --images 1000 --no-record
  fi
fi

# -- ALIGN-base under each strategy -------------------------------------------------------------------------
if [[ $sections == *" strategies "* ]]; then
  if [ "$accelerator" = gpu ]; then
    python3 benchmarks/strategies_gpu.py
  else
    python3 benchmarks/strategies_gpu.py --tiny --device cpu --strategies ddp fsdp2 --image-size 64 --batch-size 8 \
      --steps 12 --warmup 3 --pairs 32 --length 16 --workers 0 --lr 1e-3
  fi
fi

# -- the quickstart (evaluation callbacks included) under the sharded strategies ----------------------------
if [[ $sections == *" quickstart "* ]]; then
  strategies=(fsdp_align fsdp2)
  [ "$accelerator" = gpu ] || strategies=(fsdp2)
  for strategy in "${strategies[@]}"; do
    python3 -m align_lightning fit --config recipes/quickstart.yaml "${quiet[@]}" --trainer.accelerator "$accelerator" \
      --trainer.strategy "$strategy" --trainer.devices 1 --trainer.max_steps 40 --trainer.val_check_interval 20 \
      --data.init_args.num_train 2048 --data.init_args.num_val 256 --data.init_args.num_workers 4 \
      --data.init_args.root "$out/demo" --trainer.logger.init_args.save_dir "$out/$strategy" \
      >"$out/quickstart_$strategy.log" 2>&1 || { tail -n 30 "$out/quickstart_$strategy.log"; exit 1; }
    python3 benchmarks/_compare_eval.py "$out/$strategy" "$strategy" --quickstart
  done
fi

# -- FSDP1: a frozen tower and a sharded checkpoint, resumed (GPU only) -------------------------------------
if [[ $sections == *" fsdp1 "* && $accelerator == gpu ]]; then
  fsdp1=(--trainer.strategy.class_path align_lightning.strategies.ALIGNFSDPStrategy
    --trainer.strategy.init_args.state_dict_type sharded --model.model.init_args.freeze_image_tower true)
  common=("${quiet[@]}" --trainer.accelerator gpu --trainer.devices 1 --trainer.limit_val_batches 0
    --data.init_args.num_train 2048 --data.init_args.num_val 256 --data.init_args.num_workers 4
    --data.init_args.root "$out/demo" --trainer.logger.init_args.save_dir "$out/fsdp1")
  python3 -m align_lightning fit --config recipes/quickstart.yaml "${common[@]}" "${fsdp1[@]}" --trainer.max_steps 20 \
    >"$out/fsdp1_first.log" 2>&1 || { tail -n 30 "$out/fsdp1_first.log"; exit 1; }
  ckpt=$(ls -d "$out"/fsdp1/quickstart/version_0/checkpoints/* | tail -n 1)
  [ -d "$ckpt" ] || { echo "FSDP1 sharded checkpoint is not a folder: $ckpt"; exit 1; }
  python3 -m align_lightning fit --config recipes/quickstart.yaml "${common[@]}" "${fsdp1[@]}" --trainer.max_steps 30 \
    --ckpt_path "$ckpt" >"$out/fsdp1_resumed.log" 2>&1 || { tail -n 30 "$out/fsdp1_resumed.log"; exit 1; }
  echo "FSDP1 with a frozen image tower: sharded checkpoint $(basename "$ckpt") written at step 20, resumed to step 30"
fi

# -- gradient caching: ALIGN-base at batch 256 in micro-batches of 64 ----------------------------------------
if [[ $sections == *" gradcache "* ]]; then
  if [ "$accelerator" = gpu ]; then
    cached=(--batch-size 256 --micro-batch-size 64 --steps 8 --warmup 2 --pairs 1024)
    python3 benchmarks/strategies_gpu.py --strategies ddp fsdp2 "${cached[@]}"
    python3 benchmarks/strategies_gpu.py --strategies ddp --precision 16-mixed "${cached[@]}"
  else
    python3 benchmarks/strategies_gpu.py --tiny --device cpu --strategies ddp fsdp2 --image-size 64 --batch-size 16 \
      --micro-batch-size 4 --steps 8 --warmup 2 --pairs 32 --length 16 --workers 0 --lr 1e-3
  fi
fi
