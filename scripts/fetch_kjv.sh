#!/usr/bin/env bash
# The King James Bible as one UTF-8 text, for `lambdachat eval` (about 1.1M tokens, public domain).
# Downloads Debian's bible-kjv packages (no root needed), unpacks them into the cache and runs
# their `bible` program: `bible -f 'Gen1:1-Rev22:21'`. Prints the text file's path.
# Usage: scripts/fetch_kjv.sh [OUTPUT]   (default: ${XDG_CACHE_HOME:-~/.cache}/lambdachat/kjv.txt)
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/lambdachat"
out="${1:-$cache/kjv.txt}"
if [[ -s "$out" ]]; then
  echo "$out"
  exit 0
fi
command -v apt-get >/dev/null || { echo "fetch_kjv: needs apt-get (Debian/Ubuntu) to download bible-kjv" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download bible-kjv bible-kjv-text >&2) || {
  echo "fetch_kjv: apt-get download failed (try 'apt-get update' first)" >&2
  exit 1
}
mkdir -p "$work/root" "$(dirname "$out")"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
"$work/root/usr/bin/bible" -p "$work/root/usr/lib" -f 'Gen1:1-Rev22:21' > "$out.tmp"
[[ -s "$out.tmp" ]] || { echo "fetch_kjv: bible printed nothing" >&2; rm -f "$out.tmp"; exit 1; }
mv "$out.tmp" "$out"
echo "$out"
