"""The names an exported classifier's graph gives its input and output (no torch)."""

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
