// TLS and mutual TLS end to end: a `feather-grpc serve` with a throwaway private CA that requires client certificates.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { FeatherClient, FeatherError, status } from "../src";
import type { ClientOptions } from "../src";
import { startGateway } from "./gateway";
import type { Gateway } from "./gateway";

/** A CA, a server certificate for localhost / 127.0.0.1 and a client certificate (as tests/test_client_python.py). */
function makePki(dir: string): void {
  const openssl = (command: string) =>
    execFileSync("openssl", command.split(" "), { cwd: dir, stdio: ["ignore", "pipe", "pipe"], timeout: 60_000 });
  openssl("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ca -keyout ca.key -out ca.pem");
  for (const [name, san] of [
    ["server", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
    ["client", "subjectAltName=DNS:client"],
  ]) {
    openssl(`req -newkey rsa:2048 -nodes -subj /CN=${name} -keyout ${name}.key -out ${name}.csr`);
    writeFileSync(join(dir, `${name}.ext`), `${san}\n`);
    const sign = "-CA ca.pem -CAkey ca.key -CAcreateserial -days 2";
    openssl(`x509 -req -in ${name}.csr ${sign} -extfile ${name}.ext -out ${name}.pem`);
  }
}

/** The call's error, failing the test if the call succeeds. */
async function refusal(client: FeatherClient): Promise<FeatherError> {
  const error = await client.chat("refused", { model: "fast" }).then(
    (reply) => assert.fail(`expected the call to be refused, got ${JSON.stringify(reply.text)}`),
    (e: unknown) => e,
  );
  assert.ok(error instanceof FeatherError, `a FeatherError, got ${String(error)}`);
  return error;
}

describe("against a gateway serving mutual TLS", () => {
  let dir: string;
  let gateway: Gateway | undefined;
  let port: string;
  let ca: Buffer;
  let clientCert: Buffer;
  let clientKey: Buffer;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "feather-ts-pki-"));
    makePki(dir);
    [ca, clientCert, clientKey] = ["ca.pem", "client.pem", "client.key"].map((f) => readFileSync(join(dir, f)));
    const config = {
      ledger: { type: "memory" },
      providers: {
        mock: {
          type: "mock",
          models: [{ name: "mock-fast", aliases: ["fast"], inputPer1K: 0.001, outputPer1K: 0.002 }],
        },
      },
      server: {
        tls: { certFile: join(dir, "server.pem"), keyFile: join(dir, "server.key"), clientCaFile: join(dir, "ca.pem") },
      },
    };
    writeFileSync(join(dir, "feather.config.json"), JSON.stringify(config));
    gateway = await startGateway({
      config: join(dir, "feather.config.json"),
      tls: { rootCerts: ca, certChain: clientCert, privateKey: clientKey },
    });
    port = gateway.address.slice(gateway.address.lastIndexOf(":") + 1);
  });

  after(async () => {
    try {
      await gateway?.stop();
    } finally {
      if (dir) rmSync(dir, { recursive: true, force: true });
    }
  });

  /** A client that fails fast: no retries, a short deadline (a refusal must not be a DEADLINE_EXCEEDED). */
  function refusedClient(tls: ClientOptions["tls"]): FeatherClient {
    return new FeatherClient(`localhost:${port}`, { tls, retry: null, timeoutMs: 5000 });
  }

  test("a chat over mutual TLS with the CA and a client certificate gets the mock reply", async () => {
    const client = new FeatherClient(`localhost:${port}`, {
      tls: { rootCerts: ca, certChain: clientCert, privateKey: clientKey },
    });
    try {
      const reply = await client.chat("over mTLS", { model: "fast" });
      assert.equal(reply.text, "Feather mock reply to: over mTLS");
      assert.equal(reply.provider, "mock");
      assert.equal(reply.model, "mock-fast");
      assert.equal(reply.finishReason, "stop");
    } finally {
      client.close();
    }
  });

  test("a client that trusts the CA but has no client certificate is refused", async () => {
    const client = refusedClient({ rootCerts: ca });
    try {
      const error = await refusal(client);
      assert.equal(error.code, status.UNAVAILABLE, error.message);
    } finally {
      client.close();
    }
  });

  test("serverName is the name checked against the server's certificate", async () => {
    const client = refusedClient({
      rootCerts: ca,
      certChain: clientCert,
      privateKey: clientKey,
      serverName: "feather.internal",
    });
    try {
      const error = await refusal(client);
      assert.equal(error.code, status.UNAVAILABLE, error.message);
      assert.match(error.message, /feather\.internal/);
    } finally {
      client.close();
    }
  });

  test("tls: true trusts the system roots only, not the private CA", async () => {
    const client = refusedClient(true);
    try {
      const error = await refusal(client);
      assert.equal(error.code, status.UNAVAILABLE, error.message);
      assert.match(error.message, /unable to verify/);
    } finally {
      client.close();
    }
  });

  test("a plaintext client (tls: false) is refused", async () => {
    const client = refusedClient(false);
    try {
      const error = await refusal(client);
      assert.equal(error.code, status.UNAVAILABLE, error.message);
    } finally {
      client.close();
    }
  });
});
