// A grpc-js client (Node's own HTTP/2 stack, not grpc's C core) for the interop tests.
// Usage: node client.js TARGET PROTO_ROOT [GOOGLEAPIS_ROOT]  -> prints one JSON object with what it saw.
// GOOGLEAPIS_ROOT holds google/rpc/*.proto: with it, errors' google.rpc.Status details are decoded
// from grpc-status-details-bin, as a Node service calling a meshrpc one would read them.
"use strict";
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const [target, protoRoot, googleapisRoot] = process.argv.slice(2);
let Status = null;
if (googleapisRoot) {
  const root = new protobuf.Root();
  root.resolvePath = (origin, file) => (file.startsWith("google/rpc/") ? `${googleapisRoot}/${file}` : protobuf.util.path.resolve(origin, file));
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
  Status = root.lookupType("google.rpc.Status");
}

function details(err) {
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!Status || !raw) return undefined;
  const status = Status.decode(raw);
  return status.details.map((any) => {
    const type = Status.root.lookupType(any.type_url.split("/").pop());
    return { type: type.fullName.slice(1), value: type.toObject(type.decode(any.value)) };
  });
}

const definition = loader.loadSync("helloworld/helloworld.proto", { includeDirs: [protoRoot] });
const { helloworld } = grpc.loadPackageDefinition(definition);
const client = new helloworld.Greeter(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 5000);

function unary(request) {
  return new Promise((resolve) =>
    client.SayHello(request, { deadline: deadline() }, (err, reply) =>
      resolve(err ? { code: err.code, details: err.details, statusDetails: details(err) } : { message: reply.message }),
    ),
  );
}

function stream(request) {
  return new Promise((resolve) => {
    const messages = [];
    const call = client.SayHelloStream(request, { deadline: deadline() });
    call.on("data", (reply) => messages.push(reply.message));
    call.on("error", (err) => resolve({ messages, code: err.code }));
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) resolve({ messages, code: 0 });
    });
  });
}

(async () => {
  const result = {
    hello: await unary({ name: "Node" }),
    invalid: await unary({ name: "" }),
    stream: await stream({ name: "Node", count: 3 }),
  };
  console.log(JSON.stringify(result));
  client.close();
})();
