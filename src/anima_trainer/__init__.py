"""anima-trainer: LoRA/LoKr/LoHa training for the Anima text-to-image model."""

__version__ = "0.1.0"
