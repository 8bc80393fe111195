"""The fine-tuning study (README.md here); run as python -m examples.finetune.study from the repository root."""
