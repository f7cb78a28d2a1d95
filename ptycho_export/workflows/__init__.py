"""Training and inference workflows (PtychoPINN names)."""
