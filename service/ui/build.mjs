// Builds the viewer into dist/: the app's own files from src/ plus its npm dependencies
// (OpenSeadragon, js-sha256) copied from node_modules. No bundler, no network: `npm ci` fetched
// everything from the registry first. Run by `make ui`.
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const modules = join(here, "node_modules");
const version = (name) =>
  JSON.parse(readFileSync(join(modules, name, "package.json"), "utf8")).version;

rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, "vendor"), { recursive: true });
cpSync(join(here, "src"), dist, { recursive: true });
const osd = join(modules, "openseadragon", "build", "openseadragon");
cpSync(join(osd, "openseadragon.min.js"), join(dist, "vendor", "openseadragon.min.js"));
cpSync(join(osd, "images"), join(dist, "vendor", "openseadragon-images"), { recursive: true });
cpSync(
  join(modules, "js-sha256", "build", "sha256.min.js"),
  join(dist, "vendor", "sha256.min.js"),
);
writeFileSync(
  join(dist, "build.json"),
  JSON.stringify(
    { openseadragon: version("openseadragon"), "js-sha256": version("js-sha256") },
    null,
    2,
  ) + "\n",
);
console.log(`built ${dist}`);
