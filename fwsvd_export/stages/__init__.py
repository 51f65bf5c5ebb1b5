"""The stages a run composes, above the core: data, models, tasks, checkpoint, export, validation,
report, and the output folder's safety. Each reads the recipe's part it needs; none runs another."""
