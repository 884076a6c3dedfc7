"""Watch who leads, through the leader-sidecar next to this app; print one line per change.

    python watch.py [--shards] [ADDRESS]   (default $LEADER_SIDECAR_GRPC, else 127.0.0.1:4041;
                                            unix:/path too)

With --shards (a sidecar run with `--shards N`): print the shards this replica owns instead.

The .proto is compiled at run time by grpcio-tools: no generated code to keep. Copy proto/ next to
your app, or point LEADER_SIDECAR_PROTO_DIR at it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

PROTO_DIR = os.environ.get("LEADER_SIDECAR_PROTO_DIR") or str(
    Path(__file__).resolve().parents[2] / "proto"
)
sys.path.append(PROTO_DIR)  # grpc.protos_and_services finds .proto files on sys.path
pb, services = grpc.protos_and_services("leadersidecar/v1/leader.proto")


last_line = ""
# Act as leader only while the newest message says is_leader, and at most valid_for_ms after it
# arrived (the leader's stream refreshes it after every renewal, and says "not leader" when it
# runs out): an app would arm a timer with it here.
deadline = 0.0


def show(s: Any) -> None:  # a Leadership message; its class is made at run time
    global last_line, deadline
    deadline = time.monotonic() + s.valid_for_ms / 1000 if s.HasField("valid_for_ms") else 0.0
    token = s.fencing_token if s.HasField("fencing_token") else "-"
    name = pb.Leadership.State.Name(s.state).removeprefix("STATE_")
    line = (
        f"state={name} leader={s.leader or '-'} is_leader={str(s.is_leader).lower()} "
        f"fencing_token={token} revision={s.revision}"
    )
    if line != last_line:  # one line per change, not per refreshed valid_until
        print(line, flush=True)
        last_line = line


def show_shards(s: Any) -> None:  # a ShardSet message
    """Act on a shard only while the newest message lists it, and at most its valid_for_ms after
    the message arrived."""
    global last_line
    owned = " ".join(f"{o.shard}@{o.fencing_token}" for o in sorted(s.owned, key=lambda o: o.shard))
    line = f"owned=[{owned}] members={','.join(s.members) or '-'} revision={s.revision}"
    if line != last_line:
        print(line, flush=True)
        last_line = line


def main() -> None:
    args = sys.argv[1:]
    shards = "--shards" in args
    args = [a for a in args if a != "--shards"]
    address = (args or [os.environ.get("LEADER_SIDECAR_GRPC") or "127.0.0.1:4041"])[0]
    # Loopback only, inside the pod: no TLS.
    with grpc.insecure_channel(address) as channel:
        client = services.LeaderElectionStub(channel)
        shard_client = services.ShardsStub(channel)
        while True:
            try:
                # wait_for_ready: while the sidecar starts, wait for it instead of failing.
                if shards:
                    request = pb.WatchShardsRequest()
                    for shard_set in shard_client.Watch(request, wait_for_ready=True):
                        show_shards(shard_set)
                for state in client.Watch(pb.WatchRequest(), wait_for_ready=True):
                    show(state)
            except grpc.RpcError as exc:
                # The stream broke (sidecar restarting): until it is back, do not act as leader.
                print(f"watch ended: {exc.code().name}; reconnecting", file=sys.stderr)
                time.sleep(1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
