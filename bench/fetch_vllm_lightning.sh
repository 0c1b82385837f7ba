#!/usr/bin/env bash
# Fetch vLLM's lightning-attention Triton kernels for bench/kernels.py (a benchmark contender, never shipped).
#
#   bash bench/fetch_vllm_lightning.sh [WHEEL_DIR]      (default WHEEL_DIR: /tmp/vllm_whl)
#
# Downloads the vLLM 0.33.0 wheel (336 MB, no dependencies, not installed), extracts the one file
# vllm/model_executor/layers/lightning_attn.py, and replaces its three vLLM imports so it runs standalone
# (torch + triton + einops):
#   from vllm.platforms import current_platform                    -> a stub whose is_cuda() = torch.cuda.is_available()
#   from vllm.triton_utils import tl, triton                        -> import triton / import triton.language as tl
#   from vllm.v1.attention.backends.utils import PAD_SLOT_ID        -> PAD_SLOT_ID = -1
# The result goes to third_party/vllm_lightning/lightning_attn.py, which is git-ignored: the third-party file is
# never committed. Send third_party/vllm_lightning along to the GPU machine; bench/kernels.py imports it from there
# and skips the vLLM rows when it is absent.
set -euo pipefail

VERSION=0.33.0
WHEEL_DIR=${1:-/tmp/vllm_whl}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$ROOT/third_party/vllm_lightning"

shopt -s nullglob
wheels=("$WHEEL_DIR"/vllm-"$VERSION"-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    python -m pip download --no-deps "vllm==$VERSION" -d "$WHEEL_DIR"
    wheels=("$WHEEL_DIR"/vllm-"$VERSION"-*.whl)
fi
WHEEL=${wheels[0]}

mkdir -p "$DEST"
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
unzip -p "$WHEEL" vllm/model_executor/layers/lightning_attn.py > "$tmp"
sed -e 's/^from vllm.platforms import current_platform$/class current_platform:\n    @staticmethod\n    def is_cuda():\n        return torch.cuda.is_available()/' \
    -e 's/^from vllm.triton_utils import tl, triton$/import triton\nimport triton.language as tl/' \
    -e 's/^from vllm.v1.attention.backends.utils import PAD_SLOT_ID$/PAD_SLOT_ID = -1/' \
    "$tmp" > "$DEST/lightning_attn.py"

# The shim must have replaced every vLLM import (a newer file with other imports would not run standalone).
if grep -nE '^\s*(from|import) vllm' "$DEST/lightning_attn.py"; then
    echo "error: vLLM imports left in $DEST/lightning_attn.py (file changed upstream?)" >&2
    exit 1
fi
for fn in "def lightning_attention(" "def linear_decode_forward_triton("; do
    grep -q "$fn" "$DEST/lightning_attn.py" || { echo "error: '$fn' not found in the extracted file" >&2; exit 1; }
done
echo "wrote $DEST/lightning_attn.py (vLLM $VERSION, $(wc -c < "$DEST/lightning_attn.py") bytes, from $(basename "$WHEEL"))"
