"""Stand-in for a user's own optimizer package kept next to the training script (kohya users do this; the
kohya-ss/sd-scripts#2363 entry names `customized_optimizers.simplifiedademamix.SimplifiedAdEMAMix`).  Written for
the corpus, not copied: the entry tests that such a module imports and trains, not the optimizer's maths."""
