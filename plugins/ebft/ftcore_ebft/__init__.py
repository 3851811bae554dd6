"""ftcore plugin `ebft`: energy-based fine-tuning by feature matching (Jelassi et al. 2026)."""
