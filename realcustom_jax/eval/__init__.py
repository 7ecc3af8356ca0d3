"""Evaluation: CLIP-T / CLIP-I / DINO-I scores and the DreamBench layout."""
