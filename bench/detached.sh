#!/usr/bin/env bash
# Run one benchmark longer than the device's 10-minute command limit, across several commands,
# without compiling twice: the first command starts it in a process session of its own (which
# outlives the command), each command then waits for it up to WAIT seconds and copies what it
# has written so far to $OUT. Issue the next command before the machine's idle release (30 s)
# gives the machine back, or the run is lost with it.
#
#   bash bench/detached.sh start NAME WAIT 'python3 bench/serving.py ... --out "$DETACHED_OUT"'
#   bash bench/detached.sh wait NAME WAIT        # again in each later command, until it says "done"
#
# The command runs from the current directory with DETACHED_OUT set to its own results folder
# (under $DETACHED_ROOT, default /tmp/paiton-detached, outside the checkout, which each command
# replaces); its output goes to NAME.log there. Each command prints "running" or "done rc=N"
# last, and copies the results folder's files and the log to $OUT (it flattens no folders: the
# device hands back files at most two folders down), or with DETACHED_PACK=1 packs the results
# folder (subfolders included) and the log into one file, $OUT/NAME.tgz (the device hands back
# at most 8 files).
set -uo pipefail
usage() { echo "usage: $0 start NAME WAIT COMMAND | wait NAME WAIT" >&2; exit 2; }
[ $# -ge 3 ] || usage
verb=$1 name=$2 wait_s=$3
[[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "NAME must be letters, digits, '.', '_', '-'" >&2; exit 2; }
[[ $wait_s =~ ^[0-9]+$ ]] || { echo "WAIT must be whole seconds" >&2; exit 2; }
root=${DETACHED_ROOT:-/tmp/paiton-detached}
dir=$root/$name
out=${OUT:-$root/collected}

case $verb in
  start)
    [ $# -eq 4 ] || usage
    if [ -e "$dir/pid" ]; then echo "$name was started already ($dir/pid); use wait" >&2; exit 2; fi
    mkdir -p "$dir/out"
    # setsid: a process session of its own, so the command's end does not end the run. The run
    # is a shell of its own (its `exit` must not skip the line after it), whose status lands in rc.
    DETACHED_OUT=$dir/out setsid bash -c 'bash -c "$1"; echo $? > "$2"' detached "$4" "$dir/rc" \
      > "$dir/$name.log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    ;;
  wait)
    [ $# -eq 3 ] || usage
    [ -e "$dir/pid" ] || { echo "$name was never started here ($dir/pid missing; a fresh machine?)" >&2; exit 2; }
    ;;
  *) usage ;;
esac

for ((waited = 0; waited < wait_s; waited++)); do
  [ -e "$dir/rc" ] && break
  sleep 1
done
mkdir -p "$out"
if [ -n "${DETACHED_PACK:-}" ]; then
  # One archive of everything (subfolders too) instead of the files: the device hands back at
  # most 8 files, and a serving session writes a JSON, a markdown and a plot per configuration
  # and scenario, besides its logs and compile caches.
  tar czf "$out/$name.tgz" -C "$dir" out "$name.log"
else
  find "$dir/out" -maxdepth 1 -type f -exec cp {} "$out/" \;
  cp "$dir/$name.log" "$out/"
fi
if [ -e "$dir/rc" ]; then echo "done rc=$(cat "$dir/rc")"; else echo "running"; fi
