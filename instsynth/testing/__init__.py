"""Test support: tiny randomly initialised models built with the real library classes (offline)."""
