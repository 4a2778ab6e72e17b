#!/usr/bin/env bash
# Prepare a venv that runs the ComfyUI checkout you point at and this pack's whole test suite.
#
#   scripts/prepare_comfyui_venv.sh /path/to/ComfyUI [venv-dir]    (default venv: .venv-comfyui)
#
# It never downloads ComfyUI. torch and torchvision are pinned through a pip constraints file,
# because ComfyUI's requirements name them unpinned (pip would pull the newest CUDA build, GBs):
# torch 2.13.0 (on the team's machines and CI a local CPU build) with PyPI's torchvision 0.28.0. That
# torchvision is built against CUDA torch; its C ops (which ComfyUI never calls) do not load
# beside CPU torch, and scripts/torchvision_cpu_shim.py, installed into the venv here, defines
# the two op schemas its import needs (see tests/README.md). torchaudio is left out (no build
# matches torch 2.13.0); ComfyUI then only skips its audio nodes. requests is added: ComfyUI's
# app/frontend_management.py imports it without listing it.
set -euo pipefail

comfy="${1:?usage: $0 /path/to/ComfyUI [venv-dir]}"
comfy="$(cd "$comfy" && pwd)"
[ -f "$comfy/main.py" ] && [ -d "$comfy/comfy" ] || { echo "$comfy is not a ComfyUI checkout" >&2; exit 2; }
pack="$(cd "$(dirname "$0")/.." && pwd)"
venv="${2:-$pack/.venv-comfyui}"

python3 -m venv "$venv"
python="$venv/bin/python"
constraints="$venv/torch-constraints.txt"
printf '%s\n' torch==2.13.0 torchvision==0.28.0 > "$constraints"
requirements="$venv/comfyui-requirements.txt"
grep -v -E '^\s*torchaudio\b' "$comfy/requirements.txt" > "$requirements"

"$python" -m pip install --quiet -c "$constraints" torch==2.13.0 torchvision==0.28.0
site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$pack/scripts/torchvision_cpu_shim.py" "$site/ultrares_torchvision_cpu_shim.py"
echo "import ultrares_torchvision_cpu_shim" > "$site/ultrares_torchvision_cpu_shim.pth"
"$python" -m pip install --quiet -c "$constraints" -r "$requirements" requests
"$python" -m pip install --quiet -c "$constraints" -e "$pack[test]"
"$python" -c "import torchvision.transforms.functional" \
    || { echo "torchvision does not import in $venv" >&2; exit 1; }

cat <<MSG
Ready. Run the whole suite, integration tests included:
  cd $pack && COMFYUI_PATH=$comfy $venv/bin/python -m pytest
MSG
