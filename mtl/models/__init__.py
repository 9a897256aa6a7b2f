"""Models: encoders and their weights, heads, MTAN, freezing, progressive networks, TransferModel."""
