#!/bin/bash
# Runs inside a `cargo xtask vm-test` guest (as root, the host's / as its root): every test
# binary listed in $1 ("NAME EXECUTABLE PACKAGE_DIR" per line, built on the host), each from
# its package directory as cargo test runs it, privileged tests included, extra test-binary
# arguments in $2... . Ends with one "vm-suite: N passed, M failed" line; exit code: the
# number of failing binaries. Each binary's whole output goes to $VM_OUT/NAME.log (a share
# the host reads).
LIST=$1; shift
export RUST_BACKTRACE=1
P=0 F=0 fails=0
echo "vm-suite: $(uname -r), up $(cut -d' ' -f1 /proc/uptime)s"
while read -r name exe dir; do
  [ -n "$exe" ] || continue
  start=$(cut -d' ' -f1 /proc/uptime)
  # (stdin from /dev/null: nothing a test runs may read the rest of the list)
  out=$(cd "$dir" && timeout 600 "$exe" --include-ignored --test-threads=2 "$@" 2>&1 </dev/null); rc=$?
  [ -n "$VM_OUT" ] && echo "$out" > "$VM_OUT/$name.log"
  # What a reader needs: results, failures and their messages.
  echo "$out" | grep -aE '^test .* (FAILED|ignored)|^test result|panicked|^---- ' | head -60
  p=$(echo "$out" | sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' | tail -1)
  f=$(echo "$out" | sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' | tail -1)
  P=$((P + ${p:-0})); F=$((F + ${f:-0}))
  [ $rc = 0 ] || { fails=$((fails + 1)); [ -n "$f" ] || F=$((F + 1)); }
  echo "vm-suite: $name rc=$rc in $(echo "$(cut -d' ' -f1 /proc/uptime) - $start" | bc)s"
done < "$LIST"
echo "vm-suite: $P passed, $F failed"
exit $fails
