"""ftcore plugin `dpo`: DPO preference training (TRL DPOTrainer) for ftcore."""
