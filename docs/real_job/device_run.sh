#!/usr/bin/env bash
# The real job on a GPU machine, as docs/real_job/README.md reports it: every run's metrics.json, config.json,
# densenetsmi.txt and console log (no checkpoints) into one tar under $OUT.
#   bash docs/real_job/device_run.sh PIECE...
#   PIECE: warm | imports | modified | modified-hostreg | baseline | caps | cap22 | caps-rest | snapshot22 | benchmark | engine-ab
#          | epoch
# Needs: .whl/ (liger-kernel 0.8.5, llama-models 0.3.0 wheels) and .device_data/piqa-valid-1000 (PIQA's first 1,000
# validation examples, ../shared/data) beside the checkout.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # TOKENIZERS_PARALLELISM unset, as a user has it
COLLECT=/tmp/collect; mkdir -p $COLLECT /tmp/runs
python3 -m tools.real_job_data .device_data/piqa-valid-1000 /tmp/piqa16k --times 16
python3 -m tools.real_job_data .device_data/piqa-valid-1000 /tmp/piqa2k --times 2
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; df -h /tmp | tail -1; free -g | head -2;
  python3 -c "import torch, transformers, accelerate, liger_kernel, importlib.metadata as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'liger-kernel', m.version('liger-kernel'), 'llama-models', m.version('llama-models'))"
  git log --oneline -1; } > $COLLECT/machine.txt 2>&1

job() {  # job NAME SCRIPT FLAGS...: one run, timed from outside, its files collected, its checkpoints deleted
  local name=$1 script=$2; shift 2
  local start; start=$(date +%s.%N)
  python3 "$script" --model llama-3.2-1b-random --output-dir /tmp/runs/$name "$@" > $COLLECT/$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc wall_s=$(python3 -c "print(round($(date +%s.%N) - $start, 1))") cmd: python3 $script --model llama-3.2-1b-random $*" | tee -a $COLLECT/walls.txt
  mkdir -p $COLLECT/$name
  for f in metrics.json config.json densenetsmi.txt compare.md; do cp /tmp/runs/$name/$f $COLLECT/$name/ 2>/dev/null; done
  du -sm /tmp/runs/$name/* > $COLLECT/$name/disk_mib.txt 2>/dev/null
  rm -rf /tmp/runs/$name
}

timed() {  # timed LABEL COMMAND...: its wall clock into walls.txt
  local label=$1 start; shift; start=$(date +%s.%N)
  "$@" > /dev/null 2>&1
  echo "$label rc=$? wall_s=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")" | tee -a $COLLECT/walls.txt
}

for piece in "$@"; do
  case $piece in
    warm) timed "python3 -c llama3_tokenizer() (converts Llama 3's tokenizer, cached for later runs)" \
            python3 -c "from common.llama3_tokenizer import llama3_tokenizer; llama3_tokenizer()" ;;
    imports) python3 -X importtime -c "import common.run" 2> $COLLECT/importtime.txt
             timed "python3 -c 'import common.run' (the second time)" python3 -c "import common.run" ;;
    modified) job modified modified.py --data-dir /tmp/piqa16k ;;
    baseline) job baseline baseline.py --data-dir /tmp/piqa16k ;;
    modified-hostreg)  # the checkpoint's host buffers page-locked by malloc + 8 mapping threads + cudaHostRegister
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \
        job modified-hostreg modified.py --data-dir /tmp/piqa16k ;;
    caps-rest) for gib in 38 78; do for s in modified baseline; do
                 job cap$gib-$s $s.py --data-dir /tmp/piqa2k --num-train-epochs 1 --gpu-memory-gib $gib; done; done ;;
    cap22) for s in modified baseline; do
             job cap22-$s $s.py --data-dir /tmp/piqa2k --num-train-epochs 1 --gpu-memory-gib 22; done ;;
    snapshot22) python3 docs/real_job/memory_snapshot.py $COLLECT/snapshot22-baseline.txt baseline.py \
                  --model llama-3.2-1b-random --output-dir /tmp/runs/snap --data-dir /tmp/piqa2k --num-train-epochs 1 \
                  --gpu-memory-gib 22 --max-steps 1 > $COLLECT/snapshot22-baseline.log 2>&1; rm -rf /tmp/runs/snap ;;
    caps) for gib in 22 38 78; do for s in modified baseline; do
            job cap$gib-$s $s.py --data-dir /tmp/piqa2k --num-train-epochs 1 --gpu-memory-gib $gib; done; done ;;
    engine-ab)  # issue 24: the engine before its refactor (.before/: `git archive 4e3926f common tools`) and now, one
                # whole epoch each (3 + 123 steps), in one call; then modified with one mechanism off at a time
      for side in before after; do
        dir=$PWD; [ $side = before ] && dir=$PWD/.before
        (cd "$dir" && PYTHONPATH=/tmp/site:$dir python3 -m tools.benchmark --configs modified,baseline --steps 123 \
           --warmup-steps 3 --max-measure-s 200 --eval-examples 0 --json-out $COLLECT/ab-$side/benchmark.json) \
          > $COLLECT/ab-$side.log 2>&1
        echo "engine-ab $side rc=$?" | tee -a $COLLECT/walls.txt
      done
      python3 -m tools.benchmark --configs modified/no-split,modified/no-liger,modified/budget-0 \
        --steps 123 --warmup-steps 3 --max-measure-s 60 --eval-examples 0 --deadline-s 200 \
        --json-out $COLLECT/ablation/benchmark.json > $COLLECT/ablation.log 2>&1
      echo "ablation rc=$?" | tee -a $COLLECT/walls.txt ;;
    epoch)  # the scripts' steps over a whole epoch (3 + 123 steps), modified twice (its run-to-run spread), then the
            # engine before its refactor (.before/) once more, on the machine the first rows warmed
      python3 -m tools.benchmark --configs modified,baseline,modified --steps 123 --warmup-steps 3 --max-measure-s 200 \
        --eval-examples 0 --json-out $COLLECT/epoch/benchmark.json > $COLLECT/epoch.log 2>&1
      echo "epoch rc=$?" | tee -a $COLLECT/walls.txt
      if [ -d .before ]; then
        (cd .before && PYTHONPATH=/tmp/site:$PWD python3 -m tools.benchmark --configs modified --steps 123 \
           --warmup-steps 3 --max-measure-s 200 --eval-examples 0 --json-out $COLLECT/epoch-before/benchmark.json) \
          > $COLLECT/epoch-before.log 2>&1
        echo "epoch-before rc=$?" | tee -a $COLLECT/walls.txt
      fi ;;
    benchmark) python3 -m tools.benchmark --configs modified --steps 123 --max-measure-s 60 \
                 --json-out $COLLECT/benchmark/benchmark.json > $COLLECT/benchmark.log 2>&1
               echo "benchmark rc=$?" | tee -a $COLLECT/walls.txt ;;
  esac
done
tar czf $OUT/results.tgz -C $COLLECT .
