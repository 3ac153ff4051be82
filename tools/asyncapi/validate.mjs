// Validates an AsyncAPI document with @asyncapi/parser, the parser AsyncAPI's own tools
// (the CLI, the generator, Studio) use: the spec's JSON Schema plus its Spectral rules.
//
// Usage: node tools/asyncapi/validate.mjs <document>
// Prints {"parser": <version>, "diagnostics": [...]} as JSON on stdout; exits 1 when the
// document has an error diagnostic or could not be parsed, 2 on a usage error.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

// The parser ships CommonJS as its entry point: require() it rather than rely on Node's
// guess of its named exports.
const require = createRequire(import.meta.url);
const { Parser, fromFile, DiagnosticSeverity } = require('@asyncapi/parser');
const { version } = require('@asyncapi/parser/package.json');

const [path] = process.argv.slice(2);
if (!path) {
  console.error('usage: node validate.mjs <asyncapi document>');
  process.exit(2);
}

const severities = Object.fromEntries(
  Object.entries(DiagnosticSeverity)
    .filter(([, value]) => typeof value === 'number')
    .map(([name, value]) => [value, name.toLowerCase()]),
);

try {
  readFileSync(path); // a missing file is a usage error, not a "valid" empty document
} catch (error) {
  console.error(`cannot read ${path}: ${error.message}`);
  process.exit(2);
}

const { document, diagnostics } = await fromFile(new Parser(), path).parse();
const report = diagnostics.map((d) => ({
  severity: severities[d.severity] ?? String(d.severity),
  code: d.code,
  message: d.message,
  path: d.path,
}));
console.log(JSON.stringify({ parser: version, parsed: document !== undefined, diagnostics: report }, null, 2));
const failed = document === undefined || diagnostics.some((d) => d.severity === DiagnosticSeverity.Error);
process.exit(failed ? 1 : 0);
