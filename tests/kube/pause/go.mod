// The pod sandbox ("pause") image of the one-node cluster (../node.py): no registry is
// reachable, so the harness builds its own.
module leader-sidecar/tests/kube/pause

go 1.26.0
