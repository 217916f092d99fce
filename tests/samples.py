"""Where the tests find sample files kept outside the repository (one setting each).

``DL_INFERENCE_CAFFE_SAMPLES``: real Caffe models with golden outputs from real BVLC Caffe (their README
there says what each is). Default: ``../shared/caffe`` beside the repository, where the development and
CI machines have them. Tests that need them skip, naming this setting, when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

CAFFE_SAMPLES = Path(
    os.environ.get("DL_INFERENCE_CAFFE_SAMPLES") or Path(__file__).resolve().parents[1].parent / "shared" / "caffe"
)
CAFFE_SKIP_REASON = f"no Caffe sample models at {CAFFE_SAMPLES} (set DL_INFERENCE_CAFFE_SAMPLES)"
