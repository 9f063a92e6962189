// Validate Istio and Gateway API documents with @kubernetes-models' validators, which are
// generated from the official CRDs. They need nothing beside the repository, so every
// clone checks its manifests; the stricter checks (unknown fields, CEL) need the CRDs.
// Usage: node validate.mjs < documents.json  -> prints a JSON list: null or an error per document.
import { readFileSync } from "node:fs";

const PACKAGES = [
  [/\.istio\.io$/, "@kubernetes-models/istio"],
  [/^gateway\.networking\.k8s\.io$/, "@kubernetes-models/gateway-api"],
];

async function check(document) {
  const [group, version] = document.apiVersion.split("/");
  const found = PACKAGES.find(([pattern]) => pattern.test(group));
  if (!found) return `no validator for apiVersion ${document.apiVersion}`;
  let module;
  try {
    module = await import(`${found[1]}/${group}/${version}/${document.kind}`);
  } catch (err) {
    return `no model for ${document.apiVersion} ${document.kind}: ${err.message}`;
  }
  try {
    new module[document.kind](document).validate();
    return null;
  } catch (err) {
    return `${document.kind} ${document.metadata?.name}: ${err.message}`;
  }
}

const documents = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const document of documents) results.push(await check(document));
process.stdout.write(JSON.stringify(results));
