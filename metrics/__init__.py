"""Metrics of generated images: CLIP-based scores (clip.py) and the prompt sets they are read on (prompts/)."""
