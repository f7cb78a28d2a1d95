"""ptycho-runtime: load ptycho-export bundles without torch and run them fast."""
__version__ = "0.1.0"
