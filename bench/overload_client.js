// An open-loop gRPC load generator (grpc-js): calls start at a fixed rate whatever the
// server does, each with a deadline, as real callers behave (a closed loop such as h2load
// -c/-m waits for answers, so it slows down with the server and hides a collapse).
// Health probes come from a process of their own (bench/overload.py --probe), on time
// whatever this one keeps up with.
//
// Usage: node overload_client.js TARGET DESCRIPTOR_SET PHASES_JSON
//   DESCRIPTOR_SET: a FileDescriptorSet with helloworld.proto
//   PHASES_JSON: {"deadline_ms": 200, "phases": [{"rate": 700, "seconds": 5}, ...]}
// Prints one JSON object: per phase, the calls started, answered OK, the status mix, the
// p50/p99 latency of OK calls, and when the phase began (ms since the epoch).
"use strict";
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const fs = require("fs");
const [target, descriptorSet, phasesJson] = process.argv.slice(2);
const plan = JSON.parse(phasesJson);
const loaded = grpc.loadPackageDefinition(loader.loadFileDescriptorSetFromBuffer(fs.readFileSync(descriptorSet)));
const { helloworld } = loaded;
const options = { "grpc.max_concurrent_streams": 100000 };
const client = new helloworld.Greeter(target, grpc.credentials.createInsecure(), options);

const now = () => Number(process.hrtime.bigint()) / 1e6; // ms

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function runPhase(phase) {
  return new Promise((resolve) => {
    const result = { rate: phase.rate, seconds: phase.seconds, sent: 0, ok: 0, codes: {}, latencies: [] };
    result.began_at = Date.now();
    let pending = 0;
    let sending = true;
    const start = now();
    const finish = () => {
      if (sending || pending) return;
      result.latencies.sort((a, b) => a - b);
      result.p50_ms = percentile(result.latencies, 50);
      result.p99_ms = percentile(result.latencies, 99);
      delete result.latencies;
      resolve(result);
    };
    const call = () => {
      const began = now();
      result.sent += 1;
      pending += 1;
      client.SayHello({ name: "x" }, { deadline: new Date(Date.now() + plan.deadline_ms) }, (err) => {
        pending -= 1;
        const code = err ? grpc.status[err.code] || String(err.code) : "OK";
        result.codes[code] = (result.codes[code] || 0) + 1;
        if (!err) {
          result.ok += 1;
          result.latencies.push(now() - began);
        }
        finish();
      });
    };
    const tick = setInterval(() => {
      const elapsed = now() - start;
      if (elapsed >= phase.seconds * 1000) {
        clearInterval(tick);
        sending = false;
        finish();
        return;
      }
      const due = Math.floor((phase.rate * elapsed) / 1000) - result.sent;
      for (let i = 0; i < due; i++) call();
    }, 1);
  });
}

(async () => {
  const results = [];
  for (const phase of plan.phases) results.push(await runPhase(phase));
  process.stdout.write(JSON.stringify(results) + "\n");
  client.close();
})();
