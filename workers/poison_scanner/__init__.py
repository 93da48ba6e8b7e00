"""The poison-scanner worker kind: finds (and, for research, makes) poisoned training images."""
