"""Where rows come from: raw text sources, tokenizers, caches, row order, and the
non-text data (checkerboard, images, the known verse set). dataloader.py turns these
into loaders."""
