// Watch who leads, through the leader-sidecar next to this app; print one line per change.
//
//   node watch.js [--shards] [ADDRESS]   (default $LEADER_SIDECAR_GRPC, else 127.0.0.1:4041;
//                                         unix:/path too)
//
// With --shards (a sidecar run with `--shards N`): print the shards this replica owns instead.
//
// The .proto is loaded at run time: no generated code. Copy proto/ next to your app, or point
// LEADER_SIDECAR_PROTO_DIR at it.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protoDir =
  process.env.LEADER_SIDECAR_PROTO_DIR || path.join(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync("leadersidecar/v1/leader.proto", {
  includeDirs: [protoDir],
  keepCase: true, // field names as in the .proto: is_leader, fencing_token
  defaults: true, // false and 0 are sent as "absent": fill them in (`optional` fields stay unset)
  enums: String, // "STATE_LEADER" rather than 2
  longs: String, // int64 fencing tokens do not fit a JS number
});
const { LeaderElection, Shards } = grpc.loadPackageDefinition(definition).leadersidecar.v1;

const args = process.argv.slice(2);
const shards = args.includes("--shards");
const address =
  args.filter((a) => a !== "--shards")[0] || process.env.LEADER_SIDECAR_GRPC || "127.0.0.1:4041";
// Loopback only, inside the pod: no TLS.
const Service = shards ? Shards : LeaderElection;
const client = new Service(address, grpc.credentials.createInsecure());

// Act as leader only while the newest message says is_leader, and at most valid_for_ms after it
// arrived (the leader's stream refreshes it after every renewal, and says "not leader" when it
// runs out): an app would arm a timer with it here.
let lastLine = "";
let deadline = 0;

function show(s) {
  // proto3 `optional` fields are absent when unset.
  deadline = s.valid_for_ms != null ? Date.now() + Number(s.valid_for_ms) : 0;
  const token = s.fencing_token ?? "-";
  const state = s.state.replace(/^STATE_/, "");
  const line =
    `state=${state} leader=${s.leader || "-"} is_leader=${s.is_leader} ` +
    `fencing_token=${token} revision=${s.revision}`;
  if (line !== lastLine) {
    // one line per change, not per refreshed valid_until
    console.log(line);
    lastLine = line;
  }
}

// Act on a shard only while the newest message lists it, and at most its valid_for_ms after the
// message arrived.
function showShards(set) {
  const owned = set.owned
    .map((o) => `${o.shard}@${o.fencing_token}`)
    .sort()
    .join(" ");
  const line = `owned=[${owned}] members=${set.members.join(",") || "-"} revision=${set.revision}`;
  if (line !== lastLine) {
    console.log(line);
    lastLine = line;
  }
}

let stopping = false;
let call = null;

function watch() {
  // waitForReady: while the sidecar starts, wait for it instead of failing at once.
  call = client.watch({}, { waitForReady: true });
  call.on("data", shards ? showShards : show);
  call.on("error", (err) => {
    if (stopping) return;
    // The stream broke (sidecar restarting): until it is back, do not act as leader.
    console.error(`watch ended: ${err.message}; reconnecting`);
    setTimeout(() => stopping || watch(), 1000);
  });
}

watch();
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    stopping = true;
    call.cancel();
    client.close();
  });
}
