"""Model-card templates for pushed checkpoints (shipped as `hf_outliertune.model_cards`)."""
