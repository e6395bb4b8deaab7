"""Getting adapters out: PEFT export, fusing, model cards, the hub."""
