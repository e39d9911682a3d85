#!/usr/bin/env bash
# The engine's GPU checks in one go, for a machine with one CUDA device (run by hand, not in CI):
#
#   benchmarks/gpu_checks.sh CHECKPOINT OUT [cpu]
#
# CHECKPOINT: a trained default model (train.py's RUN/checkpoint, e.g. trained on a CPU); OUT: a new
# folder for the logs and runs. In order, each logged to OUT/<step>.log and timed in OUT/summary.txt:
#   1. tests: the sweep, noise, device and attribution tests with CUDA visible (the CUDA-only tests run);
#   2. paper_scale: benchmarks/paper_scale.py at paper shape (raw UNet rate, attention kernels, the
#      sweep and the engine against it, projected MSCOCO and AbC queries);
#   3. train: a 600-step train.py trainer=gpu of the default model;
#   4. attribute: attribute.py trainer=gpu for method=unlearning and method=unlearning_ekfac on
#      CHECKPOINT, each with the default engine and with the GPU engine (counter noise, bf16, a bf16
#      input cache), and for method=dtrak; their ranking.json hold the seconds per query (score_s);
#   5. compare: Spearman and top-10 overlap of the GPU engine's scores against the default's.
# A third argument `cpu` rehearses the same steps on the CPU, shrunk (a quick benchmark, 20 steps).
set -uo pipefail
CKPT=${1:?usage: benchmarks/gpu_checks.sh CHECKPOINT OUT [cpu]}
OUT=${2:?usage: benchmarks/gpu_checks.sh CHECKPOINT OUT [cpu]}
MODE=${3:-gpu}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
if [ -e "$OUT" ]; then echo "$OUT exists: give a new folder (runs are never overwritten)"; exit 2; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Two queries of the default world (its calibration prompts, not the evaluation's)
QUERY=('query.prompts=["a striped yellow cross on a black background","a barred blue circle on a black background"]'
       'query.seeds=[100,101]')
if [ "$MODE" = cpu ]; then
  TRAINER=trainer=cpu; BENCH="--device cpu --quick --threads 2"; STEPS=20
  QUERY+=('score_ids=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,1000,1001,1002,1003]')
else
  TRAINER=trainer=gpu; BENCH="--device cuda"; STEPS=600
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || exit 2
fi

step() {  # step NAME COMMAND...: run, log, time; go on after a failure so every check reports
  local name=$1; shift
  local started=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc, $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$OUT/summary.txt"
}

step tests $PY -m pytest -q -p no:warnings -rs tests/test_loss_sweep.py tests/test_counter_noise.py \
  tests/test_sharded_sweep.py tests/test_reliability_attribution.py tests/test_ekfac.py \
  tests/test_unlearning.py tests/test_attribute_job.py tests/test_pinned_scores.py
step paper_scale $PY benchmarks/paper_scale.py $BENCH
step train $PY train.py $TRAINER training.max_steps=$STEPS hydra.run.dir="$OUT/train"
ENGINE="method.noise=counter method.precision=bf16 method.input_cache_dtype=bfloat16"
[ "$MODE" = cpu ] && ENGINE="method.noise=counter method.input_cache_dtype=bfloat16"
for method in unlearning unlearning_ekfac; do
  step "attribute_$method" $PY attribute.py $TRAINER method=$method model.path="$CKPT" "${QUERY[@]}" \
    cache_dir="$OUT/cache" hydra.run.dir="$OUT/attribute/$method"
  step "attribute_${method}_engine" $PY attribute.py $TRAINER method=$method model.path="$CKPT" "${QUERY[@]}" \
    $ENGINE cache_dir="$OUT/cache" hydra.run.dir="$OUT/attribute/${method}_engine"
done
step attribute_dtrak $PY attribute.py $TRAINER method=dtrak model.path="$CKPT" "${QUERY[@]}" \
  cache_dir="$OUT/cache" hydra.run.dir="$OUT/attribute/dtrak"
step compare $PY - "$OUT/attribute" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from scipy.stats import spearmanr
root = Path(sys.argv[1])
for method in ("unlearning", "unlearning_ekfac"):
    a, b = root / method, root / f"{method}_engine"
    if not (a / "scores.npy").exists() or not (b / "scores.npy").exists():
        print(f"{method}: a run is missing"); continue
    x, y = np.load(a / "scores.npy"), np.load(b / "scores.npy")
    ids = json.loads((a / "ranking.json").read_text()).get("score_ids")  # scored columns only
    if ids is not None:
        x, y = x[:, ids], y[:, ids]
    rho = [spearmanr(p, q).statistic for p, q in zip(x, y)]
    top = [len(set(np.argsort(-p)[:10]) & set(np.argsort(-q)[:10])) for p, q in zip(x, y)]
    secs = [json.loads((d / "ranking.json").read_text())["timing"] for d in (a, b)]
    secs = [{k: round(v, 1) for k, v in t.items()} for t in secs]
    print(f"{method}: engine vs default Spearman min {min(rho):.4f} mean {np.mean(rho):.4f}, "
          f"top-10 overlap {top}; timing default {secs[0]}, engine {secs[1]}")
PY
echo "done: $OUT/summary.txt"
