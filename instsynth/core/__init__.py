"""Core: errors, atomic file I/O, logging and progress, worker pools, manifests, seeding and image resizing."""
