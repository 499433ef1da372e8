"""pacs-ai-node: a DICOM node that runs AI models on incoming studies.

Stages, in the order data flows: ingest -> store -> assemble -> infer -> encode -> deliver.
``worker`` is the one module that drives them; ``cli`` is the command line.
"""

import os

__version__ = "0.1.0"

# Two settings the package makes when it is imported, before the libraries they concern load
# (an administrator's own value in the environment wins):
#
# ONNX Runtime's PyPI builds send usage telemetry to an internet host unless this is set. A
# node on a hospital network sends nothing anywhere it was not told to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# NumPy asks the kernel for transparent huge pages for every large array. A job's arrays are
# fresh each time (the masks of a 300-slice CT are 236 MB), and on the virtual machines a node
# usually runs on, faulting them in as huge pages was 4 x slower than as normal pages
# (0.52 s against 0.13 s for those masks; the whole job 2.4-2.8 s against 2.0-2.2 s).
# NUMPY_MADVISE_HUGEPAGE=1 in the environment gives NumPy's default back.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
