"""esm-ray: model merging with essential subspaces, routed experts and Ray."""

__version__ = "0.1.0"
