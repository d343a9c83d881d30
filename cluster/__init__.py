"""Cluster definitions and tools: Ray launcher YAMLs (aws.yaml, gcp.yaml), KubeRay manifests (kuberay/), their
offline checks (validate.py) and a local multi-node cluster for development (local.py)."""
