#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 on this machine (megatron-core >= 0.17 needs 3.12), or fails.
set -u
candidates=(python3.12 python3.13 python3.14 python3 python)
for dir in "$HOME"/.pyenv/versions/3.1[2-9]*/bin /usr/local/bin /usr/bin; do
  [ -x "$dir/python3" ] && candidates+=("$dir/python3")
done
for py in "${candidates[@]}"; do
  path=$(command -v "$py" 2>/dev/null) || continue
  if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    echo "$path"
    exit 0
  fi
done
echo "no Python >= 3.12 found (tried: ${candidates[*]}); install one, e.g. 'pyenv install 3.12'" >&2
exit 1
