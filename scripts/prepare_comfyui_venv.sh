#!/usr/bin/env bash
# Prepare a venv that runs the ComfyUI checkout you point at and this pack's integration tests.
#
#   scripts/prepare_comfyui_venv.sh /path/to/ComfyUI [venv-dir]    (default venv: .venv-comfyui)
#
# It never downloads ComfyUI. torch and torchvision are pinned through a pip constraints file,
# because ComfyUI's requirements name them unpinned (pip would pull the newest CUDA build):
# PyPI's torchvision 0.28.0 does not import beside the CPU build of torch 2.13.0
# ("operator torchvision::nms does not exist"), so a matching pair is used instead:
# x86_64: torch 2.14.1 + torchvision 0.29.1; aarch64: torch 2.9.1 + torchvision 0.24.1 (CPU).
# torchaudio is left out (no build matches); ComfyUI then only skips its audio nodes.
set -euo pipefail

comfy="${1:?usage: $0 /path/to/ComfyUI [venv-dir]}"
comfy="$(cd "$comfy" && pwd)"
[ -f "$comfy/main.py" ] && [ -d "$comfy/comfy" ] || { echo "$comfy is not a ComfyUI checkout" >&2; exit 2; }
pack="$(cd "$(dirname "$0")/.." && pwd)"
venv="${2:-$pack/.venv-comfyui}"

case "$(uname -m)" in
    x86_64) pair="torch==2.14.1 torchvision==0.29.1" ;;
    aarch64|arm64) pair="torch==2.9.1 torchvision==0.24.1" ;;
    *) echo "no known torch/torchvision pair for $(uname -m)" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
constraints="$venv/torch-constraints.txt"
printf '%s\n' $pair > "$constraints"
requirements="$venv/comfyui-requirements.txt"
grep -v -E '^\s*torchaudio\b' "$comfy/requirements.txt" > "$requirements"

"$venv/bin/python" -m pip install --quiet -c "$constraints" $pair
"$venv/bin/python" -m pip install --quiet -c "$constraints" -r "$requirements" requests
"$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$pack[test]"

cat <<MSG
Ready. Run the whole suite, integration tests included:
  cd $pack && COMFYUI_PATH=$comfy $venv/bin/python -m pytest
MSG
