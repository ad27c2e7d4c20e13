#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in stages that each fit one 10-minute call:
#   bash benchmarks/gpu_session.sh <stage> [<stage> ...]      (output under $OUT, default ./gpu_out)
# Stages: env | test | bench | compile-{vit,clip,llama} | cgraphs-{vit,clip,llama} | layer | profile | memory | loop | train | train-compiled | sparse | attn | probe
# Uses the machine's python3 (with torch + CUDA); packages it lacks (hydra-core, omegaconf, open_clip,
# peft, ...) can be put as wheels in .whl/ and are installed into /tmp/site first.
set -u
OUT=${OUT:-$PWD/gpu_out}
SCRATCH=${SCRATCH:-/tmp/gpu_scratch}   # sweep folders and logs that need not come back
mkdir -p "$OUT" "$SCRATCH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
PY=python3
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
for stage in "$@"; do
  stamp "$stage"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      $PY -c "import torch, timm, transformers, peft, open_clip, lightning, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('timm', timm.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'open_clip', open_clip.__version__, 'lightning', lightning.__version__, 'hydra', hydra.__version__)" ;;
    test)
      timeout 300 $PY -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -25 ;;
    bench)
      timeout 420 $PY -m benchmarks.run --device cuda --dtype bf16 --out "$OUT/gpu_bf16.md" > "$SCRATCH/bench.log" 2>&1
      echo "exit $?"; grep -A6 "Summary against" "$OUT/gpu_bf16.md"; grep "failed" "$OUT/gpu_bf16.md" | head ;;
    compile-vit|compile-clip|compile-llama|cgraphs-vit|cgraphs-clip|cgraphs-llama)
      # one model, every configuration eager and compiled (regional: one graph per block class), interleaved in
      # one process; cgraphs-* adds CUDA graphs (inductor mode reduce-overhead). Compiling takes minutes:
      # give each call at most two of these stages.
      model=${stage#*-}; mode=""; [ "${stage%%-*}" = cgraphs ] && mode="--compile-mode reduce-overhead"
      timeout 280 $PY -m benchmarks.run --device cuda --dtype bf16 --models $model --memory none \
        --methods lora,vera-same-r,randlora,peft-randlora --compile blocks $mode \
        --out "$OUT/$stage.md" > "$SCRATCH/$stage.log" 2>&1
      echo "exit $?"; grep -A5 "Summary against" "$OUT/$stage.md"; grep -A8 "^| configuration" "$OUT/$stage.md"
      tail -3 "$SCRATCH/$stage.log" ;;
    layer)
      timeout 240 $PY -m benchmarks.layer --device cuda --dtype bf16 --shapes 768x768,3072x768,768x3072,2304x768,4096x4096,1024x4096,14336x4096,4096x14336 --tokens 2048,12608 --reps 20 --warmup 3 --out "$OUT/layer_gpu.md" > "$OUT/layer.log" 2>&1
      echo "exit $?"; tail -40 "$OUT/layer_gpu.md" ;;
    profile)
      for m in lora randlora; do
        timeout 90 $PY -m benchmarks.profile --model clip --method $m --device cuda --dtype bf16 --rows 22 2>&1 | tail -32
      done > "$OUT/profile.log"; cat "$OUT/profile.log" | cut -c1-200 ;;
    memory)
      for model in vit clip llama; do for m in lora randlora; do
        timeout 60 $PY -m benchmarks.profile --model $model --method $m --device cuda --dtype bf16 --memory 2>&1 | tail -16
      done; done > "$OUT/memory.log"; cat "$OUT/memory.log" ;;
    loop)
      timeout 300 $PY -m benchmarks.loop --accelerator gpu --precision bf16-mixed --model vit_b16 --rounds 3 --epochs 3 \
        --set model.pretrained=null data=synthetic data.synthetic.size=224 data.synthetic.per_class=300 data.num_workers=4 \
        data.batch_size=64 2>&1 | tail -8 | tee "$OUT/loop.log" ;;
    train)
      # a real bf16 run at paper shape: CLIP ViT-B/32 (random weights: no hub here), both towers adapted,
      # batch 128, synthetic 224 px images; LoRA-32 vs RandLoRA-6 as one sweep through the framework
      timeout 420 $PY train.py -m trainer=gpu model=clip_vitb32 model.pretrained=null data=synthetic \
        data.synthetic.size=224 data.synthetic.per_class=500 data.num_workers=4 data.batch_size=128 data.eval_batch_size=256 \
        data.epochs=2 adapter=lora,randlora hydra.sweep.dir="$SCRATCH/sweep" > "$OUT/train.log" 2>&1
      echo "exit $?"; $PY -m randlora.report "$SCRATCH/sweep" --out "$SCRATCH/report" 2>&1 | tail -3
      head -12 "$SCRATCH/report/report.md"
      for j in 0 1; do cp "$SCRATCH/sweep/$j/results.json" "$OUT/train_job$j.json" 2>/dev/null; done
      $PY -c "import json,sys; [print(f, json.load(open(f))['perf']) for f in sys.argv[1:]]" "$OUT"/train_job*.json ;;
    train-compiled)
      # the framework with compile.enabled=true: the same CLIP B/32 job as `train`, RandLoRA only
      timeout 420 $PY train.py trainer=gpu model=clip_vitb32 model.pretrained=null data=synthetic \
        data.synthetic.size=224 data.synthetic.per_class=500 data.num_workers=4 data.batch_size=128 data.eval_batch_size=256 \
        data.epochs=2 adapter=randlora compile.enabled=true hydra.run.dir="$SCRATCH/compiled" > "$OUT/train_compiled.log" 2>&1
      echo "exit $?"; cp "$SCRATCH/compiled/results.json" "$OUT/train_compiled.json" 2>/dev/null
      $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['perf'], r['compile'], r['metrics'].get('test/acc'))" "$OUT/train_compiled.json" ;;
    sparse)
      for dt in fp32 bf16; do timeout 120 $PY -m benchmarks.sparse_bases --device cuda --dtype $dt --out "$OUT/sparse_$dt.md" 2>&1 | tail -5; done ;;
    attn)
      # CLIP B/32 b128 bf16: the adapted attention's self-attention path vs the materialised-weight fallback
      timeout 300 $PY -m benchmarks.attn_path --device cuda --dtype bf16 --out "$OUT/attn_path_h100.md" 2>&1 | tail -14 ;;
    probe)
      timeout 200 $PY -m benchmarks.probe_fw_memory lora randlora 2>&1 | grep -v WARN | tee "$OUT/probe.log" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
stamp done
