#!/usr/bin/env bash
# Every GPU measurement of the performance issue in one run (meant for about 8 minutes on one H100 / H200), for a
# machine that has torch (and transformers, huggingface_hub) but neither diffusers nor a network. The wheels it lacks
# come along in .whl/ (ignored by git); fetch them first where pip works (Python 3.12 on the GPU machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
# then: bash bench/gpu.sh. Results: bench/results/*.json (and copied to $OUT when the device tool runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import diffusers, safetensors, tokenizers, tqdm" || { echo "error: a package is missing (see above)"; exit 1; }
R=bench/results
python3 -m bench.onestep --device cuda --dtype fp16 --out $R/onestep.json                    # end to end, batch 1 / 16
PEAK=$(python3 -c "import json; print(json.load(open('$R/onestep.json'))['bf16_peak_tflops'])")
python3 -m bench.modules --device cuda --dtype bf16 --what unet,vae,sd35m,flux --runs 10 --json $R/modules_eager.json
python3 -m bench.modules --device cuda --dtype bf16 --what unet,vae,sd35m --runs 10 --compile --json $R/modules_compiled.json
python3 -m bench.cycle --teacher sd35m --compile --steps 16 --skip 8 --peak "$PEAK" --json $R/cycle_sd35m.json
# where a cycle's time goes (eager, batch 2): the random SD3.5-Medium models bench.cycle wrote above
W=out/bench_cycle/sd35m
python3 -m bench.profile --skip 5 --iters 10 --json $R/profile_sd35m.json -- --student $W/v1-5-random.safetensors \
  --teacher $W/sd3.5_medium-random.safetensors --text-cache $W/text_cache.safetensors --out $W/profile \
  --latents 12 --held-out 4 --bridge-steps 2 --sample-every 1000000000
if [ -n "${OUT:-}" ]; then cp $R/*.json "$OUT"/; fi
