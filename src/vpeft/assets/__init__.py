"""Data files shipped inside the package, read with importlib.resources: the mini suite, the mini ViT weights and card."""
