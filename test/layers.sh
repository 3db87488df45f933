#!/usr/bin/env bash
# Check that phsync's files only call downward: every call from one .o to a
# function defined in another goes to a file listed earlier in OBJS (the
# Makefile lists them bottom-up, as phsync.h's code map does).  So the call
# graph between files has no cycle, and the file list reads bottom-up.
#
# Usage: test/layers.sh [dir]   (dir holds the built .o files; default: the tree)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$here}

# the layer order, from the Makefile
objs=$(awk '/^OBJS *=/ {on = 1; sub(/^OBJS *= */, "")}
	on {line = $0; sub(/\\$/, "", line); printf "%s ", line; if ($0 !~ /\\$/) exit}' "$here/Makefile")
declare -A rank defined_in
i=0
for o in $objs; do
	rank[$o]=$i
	i=$((i + 1))
	[ -f "$dir/$o" ] || { echo "layers.sh: $dir/$o is missing; build first" >&2; exit 2; }
	for sym in $(nm --defined-only -g "$dir/$o" | awk '$2 ~ /^[TDBR]$/ {print $3}'); do
		defined_in[$sym]=$o
	done
done

bad=0
edges=0
for o in $objs; do
	for sym in $(nm -u "$dir/$o" | awk '{print $2}'); do
		target=${defined_in[$sym]:-}
		[ -n "$target" ] && [ "$target" != "$o" ] || continue
		edges=$((edges + 1))
		if [ "${rank[$target]}" -gt "${rank[$o]}" ]; then
			echo "layers.sh: $o calls $sym in $target, a file above it" >&2
			bad=1
		fi
	done
done
if [ $bad -ne 0 ]; then
	echo "layers.sh: FAILED: calls go upward (see phsync.h for the layers)" >&2
	exit 1
fi
echo "layers.sh: $edges calls between $(echo $objs | wc -w) files, all downward"
