"""Evaluation: the shapes-world analyser (`analyse`, reading images back into scenes without a neural network)
and the grader built on it (`grader`: generate for seeded captions, read back, count per split)."""

from .grader import (ASKED_SPLITS, ATTRIBUTES, OBJECT_ATTRIBUTES, SPLITS, autoencoder_roundtrip, check_output_folder,
                     check_shapes_eval, contact_sheet, evaluate_shapes, roundtrip, shapes_prompts, summarise,
                     summarise_splits, validate_analyser)

__all__ = ["ASKED_SPLITS", "ATTRIBUTES", "OBJECT_ATTRIBUTES", "SPLITS", "autoencoder_roundtrip", "check_output_folder",
           "check_shapes_eval", "contact_sheet", "evaluate_shapes", "roundtrip", "shapes_prompts", "summarise",
           "summarise_splits", "validate_analyser"]
