#!/usr/bin/env bash
# Prints every place in the code, outside the kind registry and the kinds'
# own modules, that names a kind as a value: a string literal equal to a
# kind's name in Rust (before its tests), and in the console's JavaScript a
# literal used as a kind (a `kind:` value, a comparison, a `case`, a map
# key; headings and button labels are prose, not code naming a kind).
# Kinds are what `const KIND` says in nexus-api.
# The project's rule is that this prints nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t own < <(grep -l "const KIND: &'static str = " crates/api/src/*.rs)
kinds=$(sed -n "s/.*const KIND: &'static str = \"\([A-Za-z]*\)\";.*/\1/p" "${own[@]}" | sort -u | paste -sd'|')
skip=" crates/api/src/registry.rs ${own[*]} "
for f in $(git ls-files 'crates/*/src/*.rs' 'crates/*/src/**/*.rs'); do
    [[ "$skip" == *" $f "* ]] && continue
    # Up to the file's test module (a top-level `#[cfg(test)]`).
    awk -v f="$f" '/^#\[cfg\(test\)\]$/ { exit } { print f ":" NR ": " $0 }' "$f"
done | grep -E "\"($kinds)\"" || true
for f in $(git ls-files 'crates/*/ui/*.js' 'crates/*/ui/**/*.js'); do
    grep -nE "(kind[[:space:]]*[:=]+[[:space:]]*|[!=]==[[:space:]]*|case[[:space:]]+)['\"]($kinds)['\"]|['\"]?\b($kinds)\b['\"]?[[:space:]]*:[[:space:]]*['\"]" "$f" \
        | sed "s|^|$f:|" || true
done
