// Builds the dashboard into the Python package, so `kizuna` serves it with no npm and no CDN at run time.
import { defineConfig } from "vite";

export default defineConfig({
  base: "./",
  build: {
    outDir: "../src/kizuna/dashboard/static",
    emptyOutDir: true,
    assetsDir: "assets",
    chunkSizeWarningLimit: 700,
    sourcemap: false,
  },
});
