"""Inference: model packages (:mod:`.manifest`, checked against the ONNX graph by :mod:`.graph`),
the model input from a series (:mod:`.volume`, :mod:`.preprocess`, :mod:`.sliding`), ONNX Runtime
sessions (:mod:`.runtime`) and the set of models a configuration loads (:mod:`.models`).
"""
