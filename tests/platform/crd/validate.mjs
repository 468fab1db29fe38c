// Validates ServiceMonitor objects (JSON array on stdin) against the prometheus-operator CRD's schema, as
// compiled into @kubernetes-models/prometheus-operator. Prints one line per object; exits 1 if any is
// invalid. The compiled schema checks types, patterns and required fields, not unknown fields.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const object of objects) {
  const name = object?.metadata?.name;
  try {
    new ServiceMonitor(object).validate();
    console.log(`valid ${name}`);
  } catch (error) {
    failed++;
    console.log(`invalid ${name}: ${error.message}`);
  }
}
process.exit(failed ? 1 : 0);
