#!/usr/bin/env bash
# Replaces .ci/advisory-db/ with the current RustSec advisory database (needs its git host), keeping
# SNAPSHOT.md, and prints the commit to record there.
set -euo pipefail
cd "$(dirname "$0")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git clone --depth 1 https://github.com/rustsec/advisory-db "$tmp/db"
find advisory-db -mindepth 1 -maxdepth 1 ! -name SNAPSHOT.md -exec rm -rf {} +
git -C "$tmp/db" archive HEAD crates rust LICENSE.txt LICENSES support.toml README.md | tar -x -C advisory-db
mv advisory-db/README.md advisory-db/README-upstream.md
git -C "$tmp/db" log -1 --format='commit %H (%cs): record it in .ci/advisory-db/SNAPSHOT.md'
