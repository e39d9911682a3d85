from diffusion_attribution.models.pipeline import CheckpointError, TextToImageModel, load_training_config

__all__ = ["CheckpointError", "TextToImageModel", "load_training_config"]
