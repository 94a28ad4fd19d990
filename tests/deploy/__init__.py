"""Tests of the Kubernetes deployment files (no cluster needed)."""
