// Drives every JobService RPC (and grpc.health.v1 Check) of a running trio-jobs server with
// the official Node.js gRPC implementation (@grpc/grpc-js, pure JavaScript HTTP/2), using
// the development PKI. Prints one JSON object with what it saw; exits non-zero on surprise.
//
// usage: node node_client.js NODE_MODULES PROTO_DIR PKI_DIR IDENTITY HOST:PORT
"use strict";
const [modules, protoDir, pkiDir, identity, address] = process.argv.slice(2);
const path = require("path");
const fs = require("fs");
const grpc = require(path.join(modules, "@grpc/grpc-js"));
const loader = require(path.join(modules, "@grpc/proto-loader"));

const options = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true };
const jobsDef = loader.loadSync("trio_jobs/v1/jobs.proto", { ...options, includeDirs: [protoDir] });
const healthDef = loader.loadSync("grpc/health/v1/health.proto", { ...options, includeDirs: [protoDir] });
const JobService = grpc.loadPackageDefinition(jobsDef).trio_jobs.v1.JobService;
const Health = grpc.loadPackageDefinition(healthDef).grpc.health.v1.Health;

const read = (name) => fs.readFileSync(path.join(pkiDir, name));
const creds = grpc.credentials.createSsl(read("ca.crt"), read(`${identity}.key`), read(`${identity}.crt`));
const jobs = new JobService(address, creds);
const health = new Health(address, creds);

const unary = (client, method, request) =>
  new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + 20000 }, (err, response) =>
      resolve(err ? { code: err.code, details: err.details } : { response }));
  });

const stream = (request) =>
  new Promise((resolve) => {
    const chunks = [];
    const call = jobs.StreamOutput(request, { deadline: Date.now() + 20000 });
    call.on("data", (chunk) => chunks.push({ offset: chunk.offset, data: Buffer.from(chunk.data).toString("base64") }));
    call.on("error", (err) => resolve({ code: err.code, details: err.details, chunks }));
    call.on("end", () => resolve({ code: 0, chunks }));
  });

(async () => {
  const out = {};
  out.health = await unary(health, "Check", { service: "" });
  out.start = await unary(jobs, "StartJob", {
    command: "sh", args: ["-c", "printf 'hello from node\\n'; printf '\\000\\377' ; exit 3"],
    env: { GREETING: "hi" }, working_dir: "/tmp", limits: { memory_bytes: "268435456", pids_max: "64" },
  });
  const id = out.start.response && out.start.response.job_id;
  out.stream = await stream({ job_id: id, offset: "0", follow: true });
  out.status = await unary(jobs, "GetJobStatus", { job_id: id });
  out.list = await unary(jobs, "ListJobs", { all_users: false });
  const sleeper = await unary(jobs, "StartJob", { command: "sleep", args: ["600"] });
  out.stop = await unary(jobs, "StopJob", { job_id: sleeper.response.job_id, grace_period: { seconds: "0", nanos: 0 } });
  out.not_found = await unary(jobs, "GetJobStatus", { job_id: "11111111-1111-4111-8111-111111111111" });
  out.bad_program = await unary(jobs, "StartJob", { command: "/nonexistent/program" });
  out.bad_stream = await stream({ job_id: "11111111-1111-4111-8111-111111111111", offset: "0", follow: false });
  console.log(JSON.stringify(out));
  jobs.close();
  health.close();
})().catch((err) => { console.error(err); process.exit(1); });
