"""Pure quantization math (no IR imports)."""
