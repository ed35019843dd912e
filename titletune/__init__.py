"""titletune: fine-tune an instruct LLM to answer questions about catalogue products (see README.md)."""

from titletune.machine import passive_openmp

passive_openmp()  # before torch or llama_cpp is imported: train.py and infer.py import titletune first
