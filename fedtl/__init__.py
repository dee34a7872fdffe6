"""fedtl: federated transfer learning on Flower + Ray."""

__version__ = "0.1.0"
