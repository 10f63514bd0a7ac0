"""GGUF files for llama.cpp: the layout a model takes there, its vocabulary, and the writer."""
