"""Healing: parameter-efficient finetuning that repairs a pruned model."""
