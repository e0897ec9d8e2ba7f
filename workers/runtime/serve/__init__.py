"""Serve mode: HTTP for Knative/KServe (CloudEvents, Open Inference Protocol v2)."""
