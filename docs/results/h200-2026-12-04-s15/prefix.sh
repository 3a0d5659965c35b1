# Sourced at the start of every device call: transformers 5.24 wheel, the fixture, the project.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
export HF_MOE_ACCEL_FIXTURES=$PWD/.fx1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/r; R=$OUT/r
python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1 || { tail -5 $OUT/install.log; echo "install failed: using PYTHONPATH"; export PYTHONPATH=$PWD:/tmp/site; }

python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee $R/versions.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv -l 2 > $R/smi.csv 2>&1 &
