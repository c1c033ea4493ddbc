"""The bundled demo model: where it is, nothing more.

A 10M-parameter Mixtral (8 experts, top-2, 8 layers) trained by ``scripts/train_demo.py`` on
the Python 3.11 documentation (PSF licence), shipped in the Hugging Face layout in bf16 so that
a fresh machine can run every command without a download. It is a toy: it writes
documentation-flavoured text, not answers.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_MODEL_NAME = "offload-demo (Python docs, 10M)"
