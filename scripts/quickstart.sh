#!/usr/bin/env bash
# Embed the bundled sample slide with the full-size Virchow architecture.
# The official weights are gated, so this dry run uses explicit random weights (labelled as such in
# every output). Pass --weights DIR or --weights hf-hub:paige-ai/Virchow to use the real model.
source "$(dirname "$0")/_venv.sh" ""
.venv/bin/virchow embed-slides tests/data/wsi/CMU-1-Small-Region.svs \
    --out outputs/quickstart --model virchow --weights random:0 --device cpu --precision bf16 "$@"
