// Runs one tool of a bundle (BUNDLES.md): JSON arguments on stdin, one JSON document on stdout.
//
//     node node_runner.js ENTRY TOOL_NAME
//
// The entry is required (CommonJS) or imported (ES modules); the callable is the export named
// TOOL_NAME, else a class of that name (its `execute` on a fresh instance), else the default
// export. It is called with one object and may be async. console.log goes to stderr (the log),
// so stdout carries only the answer.
"use strict";

const path = require("path");
const { pathToFileURL } = require("url");

const out = process.stdout.write.bind(process.stdout);
console.log = console.error;
console.info = console.error;

function isClass(f) {
  return typeof f === "function" && /^class[\s{]/.test(Function.prototype.toString.call(f));
}

function pick(mod, name) {
  const candidates = [mod && mod[name], mod && mod.default && mod.default[name], mod && mod.default, mod];
  for (const c of candidates) {
    if (isClass(c)) return (args) => new c().execute(args);
    if (typeof c === "function") return c;
  }
  throw new Error(`the entry exports no function or class named "${name}" and no default`);
}

async function load(entry) {
  const file = path.resolve(entry);
  try {
    return require(file);
  } catch (err) {
    if (err && (err.code === "ERR_REQUIRE_ESM" || err instanceof SyntaxError)) {
      return import(pathToFileURL(file).href);
    }
    throw err;
  }
}

async function main() {
  const [entry, name] = process.argv.slice(2);
  let input = "";
  for await (const chunk of process.stdin) input += chunk;
  try {
    const args = JSON.parse(input || "{}");
    if (args === null || typeof args !== "object" || Array.isArray(args)) {
      throw new TypeError("the arguments must be a JSON object");
    }
    const fn = pick(await load(entry), name);
    const result = await fn(args);
    const text = JSON.stringify({ ok: true, result: result === undefined ? null : result });
    out(text + "\n");
  } catch (err) {
    const message = (err && err.message) || String(err);
    console.error(err && err.stack ? err.stack : message);
    out(JSON.stringify({ ok: false, error: message }) + "\n");
  }
}

main();
