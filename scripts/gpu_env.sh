# Sourced at the start of a command on a GPU machine that holds a copy of the working tree:
# installs the project without dependencies, points the tests at the fixtures carried in .fx/ (a copy of
# ../shared/fixtures), and records the versions and GPU under $OUT/versions.txt.
#   source scripts/gpu_env.sh && python -m pytest -q -m gpu
export PYTHONUNBUFFERED=1
export HF_MOE_ACCEL_FIXTURES=$PWD/.fx
python3 -m pip install -q --no-deps --no-build-isolation -e . > "${OUT:-/tmp}/install.log" 2>&1 \
  || { echo "install failed (see install.log): using PYTHONPATH"; export PYTHONPATH=$PWD; }
python3 - <<'PY' | tee "${OUT:-/tmp}/versions.txt"
import platform, torch, triton, transformers
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | transformers {transformers.__version__} | python {platform.python_version()}")
PY
