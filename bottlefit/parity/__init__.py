"""Numeric parity of every artifact against PyTorch fp32, in the artifact's own runtime."""
