"""Student search spaces built with NNI (DNA MBConv supernet blocks)."""
