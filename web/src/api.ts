// The gateway's API over grpc-web, with clients generated from proto/ (src/gen), and the
// token the user entered (session storage) sent as `authorization: Bearer`.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { PipelineService } from "./gen/pm/v1/pipeline_pb";
import { TaskService } from "./gen/pm/v1/task_pb";
import { TenantService } from "./gen/pm/v1/tenant_pb";

const TOKEN_KEY = "pm-token";

export function token(): string {
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

export function setToken(value: string): void {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

const bearer: Interceptor = (next) => async (req) => {
  const t = token();
  if (t) req.header.set("authorization", `Bearer ${t}`);
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  interceptors: [bearer],
});

export const tenants = createClient(TenantService, transport);
export const pipelines = createClient(PipelineService, transport);
export const tasks = createClient(TaskService, transport);

/// The field a google.rpc.BadRequest detail names, decoded by hand (two nested strings), so
/// no google/rpc code is generated for one field.
function violatedField(err: ConnectError): string {
  for (const d of err.details) {
    if (!("type" in d) || d.type !== "google.rpc.BadRequest") continue;
    const outer = fields(d.value);
    const violation = outer.get(1);
    if (!violation) continue;
    const field = fields(violation).get(1);
    if (field) return new TextDecoder().decode(field);
  }
  return "";
}

/// The length-delimited fields of a protobuf message, first occurrence of each number.
function fields(bytes: Uint8Array): Map<number, Uint8Array> {
  const out = new Map<number, Uint8Array>();
  let i = 0;
  const varint = (): number => {
    let v = 0;
    let shift = 0;
    while (i < bytes.length) {
      const b = bytes[i++];
      v += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) break;
      shift += 7;
    }
    return v;
  };
  while (i < bytes.length) {
    const key = varint();
    const wire = key & 7;
    const num = Math.floor(key / 8);
    if (wire === 2) {
      const len = varint();
      if (!out.has(num)) out.set(num, bytes.subarray(i, i + len));
      i += len;
    } else if (wire === 0) {
      varint();
    } else if (wire === 1) {
      i += 8;
    } else if (wire === 5) {
      i += 4;
    } else {
      break;
    }
  }
  return out;
}

/// What a failed call tells the user: the code's name, the field it names, the message.
export function describe(e: unknown): { code: string; field: string; message: string } {
  const err = ConnectError.from(e);
  const name = Code[err.code] ?? String(err.code);
  return {
    // gRPC's own spelling: InvalidArgument -> INVALID_ARGUMENT.
    code: name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase(),
    field: violatedField(err),
    message: err.rawMessage,
  };
}
