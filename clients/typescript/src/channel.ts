// Channel settings: the target for one or several gateways, TLS, and the service config (retry, round robin).
import { isIP } from "node:net";
import { credentials } from "@grpc/grpc-js";
import type { ChannelCredentials, ChannelOptions } from "@grpc/grpc-js";

const SERVICE = "feather.v1.FeatherService";

/** TLS settings (PEM buffers). Leave `rootCerts` unset to trust the system roots; set `certChain` and `privateKey`
 * for mutual TLS; `serverName` overrides the name checked against the server's certificate. */
export interface TlsOptions {
  rootCerts?: Buffer;
  certChain?: Buffer;
  privateKey?: Buffer;
  serverName?: string;
}

/** Client-side retries of UNAVAILABLE only, done by gRPC through the service config (see the Python client). */
export interface RetryPolicy {
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  backoffMultiplier: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 3, initialBackoffMs: 200, maxBackoffMs: 2000, backoffMultiplier: 2 };

export function serviceConfig(retry: RetryPolicy | null): string {
  const config: Record<string, unknown> = { loadBalancingConfig: [{ round_robin: {} }] };
  if (retry) {
    if (retry.maxAttempts < 2 || retry.maxAttempts > 5) {
      throw new RangeError("retry.maxAttempts must be 2 to 5 (pass retry: null to disable retries)");
    }
    config.methodConfig = [
      {
        name: [{ service: SERVICE }],
        retryPolicy: {
          maxAttempts: retry.maxAttempts,
          initialBackoff: `${(retry.initialBackoffMs / 1000).toFixed(3)}s`,
          maxBackoff: `${(retry.maxBackoffMs / 1000).toFixed(3)}s`,
          backoffMultiplier: retry.backoffMultiplier,
          retryableStatusCodes: ["UNAVAILABLE"],
        },
      },
    ];
  }
  return JSON.stringify(config);
}

/**
 * The gRPC target for one gateway or several. One `host:port` (or a target with a scheme, such as
 * `dns:///feather.internal:50051`) is used as is. Several addresses, as an array or comma-separated, must be IP
 * literals (`localhost` counts as 127.0.0.1): they become one `ipv4:`/`ipv6:` target balanced round robin.
 */
export function target(address: string | readonly string[]): string {
  const addresses = (typeof address === "string" ? address.split(",") : [...address]).map((a) => a.trim()).filter(Boolean);
  if (addresses.length === 0) throw new RangeError("no gateway address given");
  if (addresses.length === 1) return addresses[0];
  const families = new Set<number>();
  const literals = addresses.map((a) => {
    const colon = a.lastIndexOf(":");
    let host = a.slice(0, colon).replace(/^\[|\]$/g, "");
    const port = a.slice(colon + 1);
    if (colon < 0 || !/^\d+$/.test(port)) throw new RangeError(`gateway address ${JSON.stringify(a)} is not host:port`);
    if (host === "localhost") host = "127.0.0.1";
    const family = isIP(host);
    if (family === 0) {
      throw new RangeError(
        `several gateway addresses must be IP literals, got ${JSON.stringify(a)}; for host names use one DNS name ` +
          "that resolves to every gateway (e.g. dns:///feather.internal:50051)",
      );
    }
    families.add(family);
    return family === 4 ? `${host}:${port}` : `[${host}]:${port}`;
  });
  if (families.size > 1) throw new RangeError("several gateway addresses must be all IPv4 or all IPv6");
  return `ipv${[...families][0]}:${literals.join(",")}`;
}

export function channelCredentials(tls: boolean | TlsOptions): ChannelCredentials {
  if (tls === false) return credentials.createInsecure();
  const o = tls === true ? {} : tls;
  return credentials.createSsl(o.rootCerts ?? null, o.privateKey ?? null, o.certChain ?? null);
}

export function channelOptions(
  tls: boolean | TlsOptions,
  retry: RetryPolicy | null,
  extra: ChannelOptions,
): ChannelOptions {
  const options: ChannelOptions = {
    "grpc.service_config": serviceConfig(retry),
    "grpc.enable_retries": retry ? 1 : 0,
    "grpc.max_receive_message_length": 16 * 1024 * 1024,
  };
  if (typeof tls === "object" && tls.serverName) options["grpc.ssl_target_name_override"] = tls.serverName;
  return { ...options, ...extra };
}
