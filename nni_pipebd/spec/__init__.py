"""Teachers split into blocks, and the block spec pairing them with students."""
