"""LightningModules that own the loss and the metrics of each kind of experiment."""
