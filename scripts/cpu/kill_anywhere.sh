#!/usr/bin/env bash
# Every stage killed with SIGKILL at random moments on Fashion-MNIST, re-run, and compared with an uninterrupted run
# (bench/kill_anywhere.py with the docs/RESULTS.md settings; ~15 min on one core). Extra flags pass through.
cd "$(dirname "$0")/../.." && exec "${PYTHON:-python}" bench/kill_anywhere.py --trials 5 --seed 0 --out runs/kill_anywhere/summary.csv "$@"
