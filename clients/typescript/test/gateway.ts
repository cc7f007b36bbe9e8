// The gateway the tests talk to: $FEATHER_ADDR when set, otherwise a `feather-grpc serve` started here.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Client, credentials } from "@grpc/grpc-js";

const REPO = resolve(__dirname, "..", "..", "..", "..");
const SERVING = Buffer.from([0x08, 0x01]); // grpc.health.v1.HealthCheckResponse{status: SERVING}

export interface Gateway {
  address: string;
  /** True when the tests started this gateway (so they know its ledger started empty and only mock serves). */
  own: boolean;
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => ok(port));
    });
  });
}

function healthCheck(address: string): Promise<boolean> {
  const client = new Client(address, credentials.createInsecure());
  return new Promise((ok) => {
    client.makeUnaryRequest(
      "/grpc.health.v1.Health/Check",
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.alloc(0),
      { deadline: Date.now() + 1000 },
      (error, reply) => {
        client.close();
        ok(!error && reply !== undefined && reply.equals(SERVING));
      },
    );
  });
}

export async function startGateway(): Promise<Gateway> {
  if (process.env.FEATHER_ADDR) {
    return { address: process.env.FEATHER_ADDR, own: false, stop: async () => {} };
  }
  const port = await freePort();
  const cwd = mkdtempSync(join(tmpdir(), "feather-ts-"));
  const env = { ...process.env };
  for (const k of ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FEATHER_CONFIG", "PORT"]) delete env[k];
  const bin = process.env.FEATHER_GRPC_BIN ?? join(REPO, ".venv", "bin", "feather-grpc");
  const child = spawn(bin, ["serve", "--port", String(port)], { cwd, env, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr.on("data", (chunk: Buffer) => (log += chunk.toString()));
  const exited = new Promise<number | null>((ok) => child.once("exit", (code) => ok(code)));
  const address = `127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  while (!(await healthCheck(address))) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`feather-grpc serve did not become healthy:\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    address,
    own: true,
    async stop() {
      child.kill("SIGTERM");
      const code = await exited;
      rmSync(cwd, { recursive: true, force: true });
      if (code !== 0) throw new Error(`feather-grpc serve exited with ${code} on SIGTERM:\n${log}`);
    },
  };
}
