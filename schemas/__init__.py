"""JSON Schema files for every streamrec message: the contract for producers in any language."""

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
