"""Optional terms of the method, off by default, each a self-contained unit that distill.py calls in a line or two."""
