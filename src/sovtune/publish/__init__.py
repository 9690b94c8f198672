"""What leaves the machine: the model card, hub push/pull and the air-gapped bundle."""
