// A grpc-js client (Node's own HTTP/2 stack, not grpc's C core) for the interop tests.
// Usage: node client.js TARGET PROTO_ROOT  -> prints one JSON object with what it saw.
"use strict";
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target, protoRoot] = process.argv.slice(2);
const definition = loader.loadSync("helloworld/helloworld.proto", { includeDirs: [protoRoot] });
const { helloworld } = grpc.loadPackageDefinition(definition);
const client = new helloworld.Greeter(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 5000);

function unary(request) {
  return new Promise((resolve) =>
    client.SayHello(request, { deadline: deadline() }, (err, reply) =>
      resolve(err ? { code: err.code, details: err.details } : { message: reply.message }),
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
