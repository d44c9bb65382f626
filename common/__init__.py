"""The small base every layer above `model` shares: checkpoint and tokenizer resolution, devices and dtypes."""
