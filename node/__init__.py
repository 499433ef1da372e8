"""pacs-ai-node: a DICOM node that runs AI models on incoming studies.

Stages, in the order data flows: ingest -> store -> assemble -> infer -> encode -> deliver.
``worker`` is the one module that drives them; ``cli`` is the command line.
"""

__version__ = "0.1.0"
