"""pact inside other training stacks: `pact.integrations.hf` for Hugging Face
transformers' `Trainer` and TRL's `SFTTrainer` (docs/integrations.md)."""
