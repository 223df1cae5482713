#!/usr/bin/env bash
# The everyday loop's speed on this machine (README, "The two commands"): the demo after
# installation (`make demo`'s command on a clean state) and the no-op dry run on a finished demo
# (`snakemake -n`), each repeated, with the median and the per-rule times of the last demo.
#
#     benchmarks/demo_timing.sh [DEMO_REPEATS (3)] [DRY_REPEATS (5)]
#
# Runs in a scratch copy of the workflow (the checkout's data/ and results/ stay untouched), with
# the venv of `make venv` (built first if missing; its time is not counted). Targets from issue 16
# on 2 cores: no-op dry run <= 2 s, demo <= 90 s.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
demo_repeats=${1:-3}
dry_repeats=${2:-5}
make -C "$root" -s venv
export PATH="$root/.venv/bin:$PATH"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$root"/Snakefile "$root"/workflow "$root"/config "$root"/envs "$root"/src "$root"/profiles "$work"/
cd "$work"

now() { date +%s.%N; }
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(map(float, sys.argv[1:])):.2f}")' "$@"; }
demo=(snakemake -j2 --configfile config/demo.yaml) # what `make demo` runs

echo "machine: $(nproc) cores, $(python3 -c 'import os; print(round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30))') GiB; load average $(cut -d' ' -f1-3 /proc/loadavg)"
demo_times=()
for i in $(seq "$demo_repeats"); do
    rm -rf data results logs .snakemake
    t0=$(now)
    "${demo[@]}" >"$work/demo-$i.log" 2>&1 || { tail -50 "$work/demo-$i.log"; exit 1; }
    t1=$(now)
    demo_times+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")")
    echo "demo run $i: ${demo_times[-1]} s ($(grep -c '^Finished jobid' "$work/demo-$i.log") jobs)"
done

dry_times=()
for i in $(seq "$dry_repeats"); do
    t0=$(now)
    out="$(snakemake -n --configfile config/demo.yaml 2>&1)"
    t1=$(now)
    grep -q "Nothing to be done" <<<"$out" || { echo "the dry run after the demo is not a no-op:"; echo "$out" | tail -20; exit 1; }
    dry_times+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")")
done
echo "no-op dry runs: ${dry_times[*]} s"

echo "per rule, last demo run (wall seconds from Snakemake's job start/finish lines; 2 jobs may overlap):"
python3 - "$work/demo-$demo_repeats.log" <<'EOF'
import re, sys
from datetime import datetime
stamp, started, rule_of, spans = None, {}, {}, []
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    line = line.rstrip("\n")
    if m := re.fullmatch(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", line):
        stamp = datetime.strptime(re.sub(" +", " ", m.group(1)), "%a %b %d %H:%M:%S %Y")
    elif m := re.fullmatch(r"(?:local)?rule (\w+):", line):
        rule = m.group(1)
    elif m := re.fullmatch(r"\s+jobid: (\d+)", line):
        started[m.group(1)], rule_of[m.group(1)] = stamp, rule
    elif m := re.match(r"Finished jobid: (\d+)", line):
        spans.append((rule_of[m.group(1)], (stamp - started[m.group(1)]).total_seconds()))
for rule, seconds in sorted(spans, key=lambda s: -s[1]):
    print(f"  {seconds:5.0f}  {rule}")
EOF

echo "demo after install: median $(median "${demo_times[@]}") s over ${demo_repeats} runs (${demo_times[*]}); target <= 90 s"
echo "no-op dry run:      median $(median "${dry_times[@]}") s over ${dry_repeats} runs; target <= 2 s"
