import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// Relative asset paths: the control plane serves dist/ at its dashboard port's root.
export default defineConfig({
  plugins: [react()],
  base: "./",
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false },
});
