"""st-scale: Stimulative Training of residual networks at cluster scale."""

__version__ = "0.1.0"
