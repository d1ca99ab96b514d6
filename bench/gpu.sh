#!/usr/bin/env bash
# Every GPU measurement of issue 26 in one run (about 8 minutes on one H100 / H200), for a machine that has torch but
# neither diffusers nor a network: the wheels come along in .whl/ (fetch them here first, with network:
#   pip download --no-deps -d .whl diffusers==0.42.1 transformers==5.23.0 huggingface_hub regex
# ), then: bash bench/gpu.sh. Results: bench/results/*.json (and in $OUT when the device tool runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps --no-index .whl/*.whl
R=bench/results
python -m bench.onestep --device cuda --dtype fp16 --out $R/onestep.json                      # end to end, batch 1 / 16
PEAK=$(python -c "import json; print(json.load(open('$R/onestep.json'))['bf16_peak_tflops'])")
python -m bench.modules --device cuda --dtype bf16 --what unet,vae,sd35m,flux --runs 10 --json $R/modules_eager.json
python -m bench.modules --device cuda --dtype bf16 --what unet,vae,sd35m --runs 10 --compile --json $R/modules_compiled.json
python -m bench.cycle --teacher sd35m --compile --steps 16 --skip 8 --peak "$PEAK" --json $R/cycle_sd35m.json
if [ -n "${OUT:-}" ]; then cp $R/*.json "$OUT"/; fi
