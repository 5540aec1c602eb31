"""Foundations every layer uses: errors and atomic I/O (io), the label table and prompt bank (labels), the
ordered worker map (parallel), image and mask helpers (imageops) and the generation.json manifest (manifests)."""
