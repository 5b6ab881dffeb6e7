#!/usr/bin/env bash
# Issue 17's lever matrix in one call (budget: 8 minutes): e5-large batch 512 and e5-small batch 2048, each
# lever alone and all together (koe5 only), sentence-transformers' two paths once per shape in the same run
# (the ratios' denominators), then encoding. One bench_train.py process per row; the random-weight models
# are built once and reused (--models). Every row appends to $OUT/levers.jsonl; a stage past its deadline
# is skipped, so the call ends inside its limit with whatever finished.
#
#   bash benchmarks/device/levers.sh                 # on the lent GPU (unpacks .device/site.tar.xz if there)
#   SMOKE=1 bash benchmarks/device/levers.sh         # tiny shape on the CPU, to test this script first
#   ONLY="compile all" bash benchmarks/device/levers.sh   # a follow-up call: only these rows (the ST rows are
#                                                         # "sentence-transformers", encoding is "encode")
#
# A lever is a name and the bench_train.py flags that switch it (spec keys through --set). Other levers add
# their line to LEVERS; "all" must then carry their flags too.
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/koe5-levers-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/levers.log") 2>&1
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(elapsed) s] $*"; }
END=${END:-470}   # no row starts after this many seconds, and a running one is stopped there
ONLY=${ONLY:-}
SMOKE=${SMOKE:-0}

LEVERS=(
  "base|--no-host-lengths --prefetch 0"      # before issue 17: the input path timed serially, lengths read from the device
  "host-lengths|--prefetch 0"                # lever 3: lengths from the host (no per-chunk syncs either way now)
  "prefetch|--no-host-lengths --prefetch 2"  # lever 4: inputs built 2 steps ahead, pinned, non_blocking copies
  "compile|--no-host-lengths --prefetch 0 --set train.compile=true"  # lever 2 (compiles during the warm-up step)
  "varlen|--no-host-lengths --prefetch 0 --attention varlen"  # lever 5: packed tokens through varlen_attn (bf16)
  "all|--prefetch 2 --set train.compile=true"
  "all-varlen|--prefetch 2 --attention varlen"
  # every lever at once; varlen with compile is proven on the CPU (tests/test_attention.py), and its own row
  # means a compile failure of varlen_attn on the GPU costs only this row
  "every|--prefetch 2 --attention varlen --set train.compile=true"
)
if [ "$SMOKE" = 1 ]; then
  # inductor's C++ code generation takes minutes per graph on a small CPU; the smoke run tests the script
  export KOE5_COMPILE_BACKEND=${KOE5_COMPILE_BACKEND:-aot_eager}
  common=(--device cpu --steps 1 --models "$OUT/models")
  shapes=("tiny|16|8")
  encode=(--shape tiny --encode 64)
else
  common=(--device cuda --steps 3 --models /tmp/koe5-bench-models)
  shapes=("e5-large|512|128" "e5-small|2048|512")
  encode=(--shape e5-large --encode 8192)
fi
# On the lent machine: koe5's dependencies the GPU image lacks, carried as in gpu_session.sh (once per machine).
if [ -f .device/site.tar.xz ] && [ "$SMOKE" != 1 ]; then
  [ -d /tmp/koe5-site ] || python3 -c 'import tarfile
tarfile.open(".device/site.tar.xz").extractall("/tmp/koe5-site", filter="fully_trusted")' || exit 10
  export PYTHONPATH=$PWD:/tmp/koe5-site
fi
[ -n "${PYTHONPATH:-}" ] || export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

row() {  # row NAME LEVER FLAGS...: one bench_train.py call, stopped at the deadline
  local name=$1 lever=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $lever "* ]]; then return; fi
  local budget=$(( END - $(elapsed) ))
  if [ "$budget" -lt 15 ]; then log "deadline: skipping $name"; return; fi
  log "$name: $*"
  timeout -s TERM "$budget" python3 benchmarks/bench_train.py "${common[@]}" "$@" --out "$OUT/levers.jsonl" \
    > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 4 "$OUT/$name.txt"
  log "$name exit $rc"
}

for s in "${shapes[@]}"; do
  IFS='|' read -r shape batch chunk <<< "$s"
  sizes=(--shape "$shape" --batch "$batch" --chunk "$chunk")
  if [ "$SMOKE" = 1 ]; then st=(st-cached-mnrl); else st=(st-cached-mnrl st-replay-autocast); fi
  row "$shape-sentence-transformers" sentence-transformers "${sizes[@]}" --variants "${st[@]}"
  for lever in "${LEVERS[@]}"; do
    IFS='|' read -r name flags <<< "$lever"
    # shellcheck disable=SC2086  # the flags are a list
    row "$shape-$name" "$name" "${sizes[@]}" --variants koe5 $flags
  done
done
row encode encode "${encode[@]}" --variants koe5 --batch 16 --chunk 8 --steps 1
log "done"
