"""LoRA and its kin (LoCon, LoHa, LoKr): `formats` reads, matches and writes the files people share; `adapters`
wraps the modules of a built model with them (the model code knows nothing of LoRA)."""
