"""Work assignment as plain data: block costs, stage boundaries, block-to-worker assignment."""
