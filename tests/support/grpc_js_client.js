// A second gRPC implementation as the client: @grpc/grpc-js on Node, for tests/test_grpc_js.py.
//
//   node grpc_js_client.js '{"address": "127.0.0.1:PORT", "mode": "spread", ...}'
//
// ONE client object (one channel, one HTTP/2 connection) to sidelink's listener, calling
// the service of tests/support/grpc_servers.py (`sidelink.test.Pod`) with raw bytes both
// ways: identity serializers through makeGenericClientConstructor, no protobuf. Every
// answer is the name of the pod that gave it. The results go to stdout as one JSON line.
//
// Modes:
//   spread    `unary` Who calls one after another, `parallel` Who calls all at once, then
//             one call of each streaming kind (Stream, Sum, Chat, `messages` messages each)
//             -> {"unary": {pod: n}, "parallel": {pod: n}, "streams": {kind: [pods]},
//                 "failures": [...]}
//   failures  one call of each kind, every one expected to fail
//             -> {"failures": [{kind, code, details, metadata}], "succeeded": [kinds]}
//
// @grpc/grpc-js is found through NODE_PATH (the test installs it outside the repo).
"use strict";

const grpc = require("@grpc/grpc-js");

const SERVICE = "sidelink.test.Pod";
const identity = (b) => b;

function method(name, requestStream, responseStream) {
  return {
    path: `/${SERVICE}/${name}`,
    requestStream,
    responseStream,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  };
}

const Pod = grpc.makeGenericClientConstructor(
  {
    Who: method("Who", false, false),
    Stream: method("Stream", false, true),
    Sum: method("Sum", true, false),
    Chat: method("Chat", true, true),
  },
  SERVICE,
);

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// A failure as data: the status, and the metadata it came with (trailers, for gRPC).
function failure(kind, error) {
  const metadata = {};
  if (error && error.metadata) {
    for (const [key, value] of Object.entries(error.metadata.getMap())) {
      metadata[key] = Buffer.isBuffer(value) ? value.toString("base64") : String(value);
    }
  }
  return {
    kind,
    code: error && error.code !== undefined ? error.code : null,
    details: error ? String(error.details || error.message || error) : null,
    metadata,
  };
}

function who(client, timeout) {
  return new Promise((resolve, reject) => {
    client.Who(Buffer.alloc(0), { deadline: deadline(timeout) }, (error, answer) =>
      error ? reject(error) : resolve([answer.toString()]),
    );
  });
}

function collect(call) {
  return new Promise((resolve, reject) => {
    const pods = [];
    call.on("data", (m) => pods.push(m.toString()));
    call.on("error", reject);
    call.on("end", () => resolve(pods));
  });
}

function stream(client, n, timeout) {
  return collect(client.Stream(Buffer.from(String(n)), { deadline: deadline(timeout) }));
}

function sum(client, n, timeout) {
  return new Promise((resolve, reject) => {
    const call = client.Sum({ deadline: deadline(timeout) }, (error, answer) => {
      if (error) return reject(error);
      const [pod, count] = answer.toString().split(" ");
      if (Number(count) !== n) return reject(new Error(`the pod counted ${count}, not ${n}`));
      resolve([pod]);
    });
    for (let i = 0; i < n; i++) call.write(Buffer.from("x"));
    call.end();
  });
}

// Bidi, in turn: each message is written once the answer to the one before has come.
function chat(client, n, timeout) {
  return new Promise((resolve, reject) => {
    const call = client.Chat({ deadline: deadline(timeout) });
    const pods = [];
    call.on("data", (m) => {
      pods.push(m.toString());
      if (pods.length < n) call.write(Buffer.from("x"));
      else call.end();
    });
    call.on("error", reject);
    call.on("end", () => resolve(pods));
    call.write(Buffer.from("x"));
  });
}

const KINDS = {
  unary: (client, n, timeout) => who(client, timeout),
  server_stream: stream,
  client_stream: sum,
  bidi: chat,
};

function count(answers, into) {
  for (const pods of answers) into[pods[0]] = (into[pods[0]] || 0) + 1;
  return into;
}

async function spread(client, args) {
  const out = { unary: {}, parallel: {}, streams: {}, failures: [] };
  const timeout = args.timeout || 10;
  for (let i = 0; i < args.unary; i++) {
    try {
      count([await who(client, timeout)], out.unary);
    } catch (error) {
      out.failures.push(failure("unary", error));
    }
  }
  const parallel = await Promise.allSettled(
    Array.from({ length: args.parallel || 0 }, () => who(client, timeout)),
  );
  for (const p of parallel) {
    if (p.status === "fulfilled") count([p.value], out.parallel);
    else out.failures.push(failure("parallel", p.reason));
  }
  for (const kind of ["server_stream", "client_stream", "bidi"]) {
    try {
      out.streams[kind] = await KINDS[kind](client, args.messages || 5, timeout);
    } catch (error) {
      out.failures.push(failure(kind, error));
    }
  }
  return out;
}

async function failures(client, args) {
  const out = { failures: [], succeeded: [] };
  for (const [kind, call] of Object.entries(KINDS)) {
    try {
      await call(client, 3, args.timeout || 5);
      out.succeeded.push(kind);
    } catch (error) {
      out.failures.push(failure(kind, error));
    }
  }
  return out;
}

async function main() {
  const args = JSON.parse(process.argv[2]);
  // No retries of grpc-js's own (transparent or configured): what the test counts is
  // what sidelink did.
  const client = new Pod(args.address, grpc.credentials.createInsecure(), {
    "grpc.enable_retries": 0,
  });
  try {
    const modes = { spread, failures };
    const result = await modes[args.mode](client, args);
    result.grpc_js = require("@grpc/grpc-js/package.json").version;
    process.stdout.write(JSON.stringify(result) + "\n");
  } finally {
    client.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stderr.write(`${(error && error.stack) || error}\n`);
    process.exit(1);
  },
);
