"""poison-scanner worker kind: backdoor poisoning of datasets and the defenses that find poisoned images."""
