#!/usr/bin/env bash
# Fail when the committed stubs differ from what proto/ generates (CI runs this).
#   scripts/check_proto.sh          Python and Go stubs (Go needs `go` and the module proxy)
#   SKIP_GO=1 scripts/check_proto.sh   Python stubs only
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT

"$repo/scripts/gen_proto.sh" "$fresh"
status=0
compare() {
    if ! diff -ru --exclude=__pycache__ "$repo/$1" "$fresh/$1"; then
        echo "check_proto: $1 is stale: run scripts/gen_proto.sh and commit the result" >&2
        status=1
    fi
}
compare sidecar/api/_pb
if [[ -d $fresh/examples/go/leadersidecarv1 ]]; then
    compare examples/go/leadersidecarv1
fi
[[ $status == 0 ]] && echo "check_proto: generated stubs are up to date"
exit $status
