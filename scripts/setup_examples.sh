#!/usr/bin/env bash
# Make the example gRPC clients runnable; the e2e tests run them against real sidecars
# (tests/e2e/test_grpc_examples.py; REQUIRE_EXAMPLES=1 turns their "not set up" skip into a failure).
#   node:   npm ci in examples/node (@grpc/grpc-js, @grpc/proto-loader, from package-lock.json)
#   go:     examples/go/bin/watch (google.golang.org/grpc from the Go module proxy, per go.sum)
#   python: grpcio and grpcio-tools (usually there already: the test extras include them)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

(cd "$repo/examples/node" && npm ci --no-audit --no-fund --loglevel=error)
(cd "$repo/examples/go" && go build -trimpath -o bin/watch .)
if ! "$python" -c "import grpc, grpc_tools" 2> /dev/null; then
    "$python" -m pip install -r "$repo/examples/python/requirements.txt"
fi
echo "setup_examples: node, go and python clients are ready"
