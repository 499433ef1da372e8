"""pacs-ai-node: a DICOM node that runs AI models on incoming studies.

Stages, in the order data flows: ingest -> store -> assemble -> infer -> encode -> deliver.
``worker`` is the one module that drives them; ``cli`` is the command line.
"""

import os

__version__ = "0.1.0"

# ONNX Runtime's PyPI builds send usage telemetry to an internet host unless this is set
# before the library loads. A node on a hospital network sends nothing anywhere it was not
# told to: this is the one thing the package does when it is imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
