"""Assets shipped inside the package: the mini suite and the pre-trained mini ViT."""
