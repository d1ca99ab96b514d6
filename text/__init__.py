"""Text: the CLIP and T5 encoders, their tokenizers, and the text-embedding cache distill.py trains from."""
