"""Training data: reading triple files and drawing global batches from them."""
