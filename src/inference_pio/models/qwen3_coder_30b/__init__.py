"""Qwen3-Coder-30B-A3B-Instruct: tool-call parsing, FIM prompts and the product plugin."""
