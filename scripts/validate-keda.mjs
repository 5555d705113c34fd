// Validates KEDA objects against KEDA's CRD schemas, as compiled by @kubernetes-models/keda:
// types, required fields and enums. The compiled schemas accept unknown fields, so the
// fields of a ScaledObject's spec and of each trigger are also checked against the model's
// declared properties. A prometheus trigger needs the scaler's own metadata keys.
// Usage, from the directory whose node_modules has the models (.tools/npm):
//   node --input-type=module - OBJECTS.json < scripts/validate-keda.mjs
// (OBJECTS.json: a JSON array of objects).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const models = join(process.cwd(), "node_modules/@kubernetes-models/keda/keda.sh/v1alpha1");

// The property names an interface of the models declares (`"name"?: type;` lines).
function declared(model) {
  const text = readFileSync(join(models, `${model}.d.ts`), "utf8");
  const body = text.slice(text.indexOf("export interface"), text.indexOf("}\n"));
  return new Set([...body.matchAll(/^\s+"(\w+)"\??:/gm)].map((m) => m[1]));
}

function unknown(what, object, allowed) {
  return Object.keys(object ?? {})
    .filter((k) => !allowed.has(k))
    .map((k) => `${what}.${k} is not a field of ${what}`);
}

const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
const specFields = declared("ScaledObjectSpec");
const triggerFields = declared("ScaleTriggers");
let failed = 0;
for (const object of objects) {
  const name = `${object.kind}/${object.metadata?.name}`;
  const problems = [];
  if (object.kind !== "ScaledObject") {
    problems.push("only ScaledObjects are checked here");
  } else {
    try {
      new ScaledObject(object).validate();
    } catch (e) {
      problems.push(e.message);
    }
    problems.push(...unknown("spec", object.spec, specFields));
    for (const [i, trigger] of (object.spec?.triggers ?? []).entries()) {
      problems.push(...unknown(`spec.triggers[${i}]`, trigger, triggerFields));
      if (trigger.type === "prometheus") {
        for (const key of ["serverAddress", "query", "threshold"]) {
          if (!trigger.metadata?.[key]) problems.push(`spec.triggers[${i}].metadata.${key} is required by the prometheus scaler`);
        }
      }
    }
  }
  if (problems.length > 0) {
    failed += 1;
    console.error(`${name}: ${problems.join("; ")}`);
  }
}
if (failed > 0) process.exit(1);
console.log(`${objects.length} KEDA object(s) valid`);
