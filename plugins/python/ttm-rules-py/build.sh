#!/bin/sh
# Builds ttm-rules-py.wasm (about 18 MB: CPython and the app) from app.py.
# Needs componentize-py (pip install componentize-py==0.25.1).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/ttm-rules-py.wasm}
cd "$here"
componentize-py -d "$here/../../../wit" -w standalone componentize app -o "$out"
