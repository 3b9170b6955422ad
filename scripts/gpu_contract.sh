#!/usr/bin/env bash
# Issue 12 item 7(a): the KV connector contract with the fake executor's pools on a real CUDA
# device (staging, streams, events and cross-device copies are then real). One line per check,
# well under ten minutes. Runs from the repository with only PyTorch (CUDA build), pyzmq,
# msgspec, xxhash, structlog, numpy, pyyaml and prometheus-client installed: no pytest, no
# TensorRT-LLM (tests/connector/test_gpu_contract.py checks that import closure on CPU).
# Exit status: 0 all passed, 1 a check failed, 2 no CUDA device, 124 past the time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
errors="$(mktemp)"
timeout "${GPU_CONTRACT_TIMEOUT_S:-540}" "$python" -m tests.connector.gpu_contract "$@" \
    2>"$errors" | grep --line-buffered -E '^(INFO|PASS|FAIL|SKIP|DONE)'
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "--- stderr, last 80 lines (rc=$rc)"
    tail -n 80 "$errors"
fi
rm -f "$errors"
exit "$rc"
