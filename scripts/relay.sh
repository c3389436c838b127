#!/usr/bin/env bash
# Move a file larger than a remote GPU host's 64 MiB upload limit to it in <= 50 MB parts.
#
# Here:    scripts/relay.sh stage FILE N   # put part N of FILE (0-based) into .relay/ (git-ignored)
# There:   scripts/relay.sh stash          # (on the host, .relay copied) copy staged parts to /root/stash
# There:   scripts/relay.sh assemble NAME SHA256 [DEST]   # concatenate parts, check the hash
#
# Stage part 0, run `stash`, stage part 1, run `stash` (+ `assemble`) in quick succession: a host
# released between jobs comes back with an empty /root/stash.
set -euo pipefail
PART_BYTES=${PART_BYTES:-50000000}
STASH=${STASH:-/root/stash}
cmd=${1:?usage: relay.sh stage FILE N | stash | assemble NAME SHA256 [DEST]}
case "$cmd" in
  stage)
    file=${2:?FILE}; n=${3:?N}
    name=$(basename "$file")
    parts=$(( ($(stat -c %s "$file") + PART_BYTES - 1) / PART_BYTES ))
    (( n < parts )) || { echo "part $n does not exist: $file has $parts parts" >&2; exit 2; }
    rm -rf .relay && mkdir -p .relay
    dd if="$file" of=".relay/$name.part$(printf %03d "$n")" bs=$PART_BYTES skip="$n" count=1 status=none
    echo "staged part $n of $parts of $name; sha256 $(sha256sum "$file" | cut -d' ' -f1)"
    ;;
  stash)
    mkdir -p "$STASH" && cp -v .relay/* "$STASH"/
    ;;
  assemble)
    name=${2:?NAME}; sha=${3:?SHA256}; dest=${4:-$STASH/$name}
    cat "$STASH/$name".part* > "$dest.tmp"
    echo "$sha  $dest.tmp" | sha256sum -c --quiet || { echo "sha256 mismatch for $name: missing part?" >&2; exit 3; }
    mv "$dest.tmp" "$dest" && rm -f "$STASH/$name".part* && echo "assembled $dest"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
