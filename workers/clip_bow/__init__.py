"""clip-bow-trainer: CLIP-style training on bag-of-words captions ("A Fistful of Words")."""
