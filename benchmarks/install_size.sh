#!/usr/bin/env bash
# What each install of alambic costs (issue 25, "a lean install"): on a fresh venv per extra, install the
# CPU build of torch first (as .ci/run does; not timed), then time `pip install -e .[extra]` with the
# versions pinned in .ci/constraints.txt, count the installed packages and measure the venv on disk.
# In the core venv, also check that `alambic demo` runs and that `alambic demo --task lm` refuses in one
# line (exit code 2) without transformers. The venvs are deleted afterwards (KEEP=1 keeps them).
#
#     bash benchmarks/install_size.sh [core hf dev]      # run from the repository root
#
# pip's cache is left as it is: a warm cache measures resolving, unpacking and writing, not the download.
set -uo pipefail
cd "$(dirname "$0")/.."
extras=("$@")
[ ${#extras[@]} -eq 0 ] && extras=(core hf dev)
printf '%-6s %9s %9s %12s\n' install packages "size" "install (s)"
for extra in "${extras[@]}"; do
  venv="/tmp/v_${extra}"
  rm -rf "$venv"
  python -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.13.0 -c .ci/constraints.txt
  target="."
  [ "$extra" != core ] && target=".[${extra}]"
  start=$(date +%s.%N)
  "$venv/bin/pip" install --quiet -c .ci/constraints.txt -e "$target" >"/tmp/install_${extra}.log" 2>&1 \
    || { echo "$extra: install failed, see /tmp/install_${extra}.log"; continue; }
  end=$(date +%s.%N)
  count=$("$venv/bin/pip" list --format=freeze 2>/dev/null | wc -l)
  size=$(du -sh "$venv" | cut -f1)
  printf '%-6s %9s %9s %12.1f\n' "$extra" "$count" "$size" "$(echo "$end - $start" | bc)"
  if [ "$extra" = core ]; then
    demo_dir=$(mktemp -d)
    if (cd "$demo_dir" && "$venv/bin/alambic" demo --out runs >"$demo_dir/demo.log" 2>&1); then
      echo "core: alambic demo ran (exit 0): $(tail -n 3 "$demo_dir/demo.log" | tr '\n' ' ')"
    else
      echo "core: alambic demo FAILED, see $demo_dir/demo.log"
    fi
    (cd "$demo_dir" && "$venv/bin/alambic" demo --task lm --out runs >"$demo_dir/lm.log" 2>&1)
    echo "core: alambic demo --task lm: exit $?, $(wc -l <"$demo_dir/lm.log") line(s): $(cat "$demo_dir/lm.log")"
  fi
  [ "${KEEP:-0}" = 1 ] || rm -rf "$venv"
done
