#!/usr/bin/env bash
# Set up the pinned CPU environment, build the demo corpus (Python's own documentation text:
# standard-library docstrings, present on any machine), and pretrain a tiny GPT-MoE with
# 2 processes and expert parallelism 2. Extra arguments are config overrides, e.g.
#   bash scripts/demo.sh moe.impl=fastermoe train.iters=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
if [ ! -f data/demo/corpus_text_document.idx ] || [ ! -f data/demo/tokenizer.json ]; then
  "$PY" scripts/build_demo_corpus.py --out data/demo/corpus.jsonl
  "$PY" scripts/preprocess_data.py --input data/demo/corpus.jsonl --output-prefix data/demo/corpus \
    --tokenizer-type bpe --vocab-size 4096
fi
export OMP_NUM_THREADS=1
exec "$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29500}" \
  pretrain_gpt_moe.py --config configs/gpt_moe_tiny.yaml "$@"
